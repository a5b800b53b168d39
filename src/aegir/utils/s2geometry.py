"""Vectorised S2 geometry cell ids, tokens, cell polygons and coverings (pure numpy + shapely), plus H3 cells.

Cell ids equal ``s2cell.lat_lon_to_cell_id`` bit for bit: same S2Point (non-geodetic unit sphere), face selection,
quadratic UV→ST projection, ST→IJ floor/clamp and 4-bit Hilbert lookup table as the S2 reference / ``s2cell``.
Coordinates are EPSG:4326 degrees (``lat`` in [-90, 90], any finite ``lon``). Tokens are the lower-case hex cell
id with trailing zeros stripped (the zero id is ``"X"``).

Exactness: numpy's float64 ``sin``/``cos`` may differ from libm by an ulp on some CPUs; points whose face or
IJ lies within 1e-13 (ST units) of a decision boundary are recomputed with :mod:`math` (a few per 10^4 at
level 30, none in practice at coarse levels), so the result does not depend on the SIMD build.

Cell polygons are lon/lat rings through the cell's (densified) great-circle edges. In S2, lon ±180 is a cell
edge at every level >= 1, so only the level-0 face 3 crosses it (returned as a MultiPolygon split at ±180);
cells on the antimeridian get the matching ±180 sign, and cells touching a pole get an edge along lat = ±90. Coverings treat the input geometry as planar in lon/lat (shapely's model); geometries that cross
the antimeridian must be given split at ±180 (RFC 7946 style).

Length: this module is one algorithm (ids → tokens → cell vertices → polygons → coverings, sharing the projection
and Hilbert tables); it stays whole at ~520 lines rather than split the tables from the code that reads them.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import h3
import numpy as np
import shapely
import shapely.affinity

MAX_LEVEL = 30
_MAX_SIZE = 1 << MAX_LEVEL
_POS_BITS = 2 * MAX_LEVEL + 1
_SWAP, _INVERT = 1, 2
_POS_TO_IJ = ((0, 1, 3, 2), (0, 2, 3, 1), (3, 2, 0, 1), (3, 1, 0, 2))
_POS_TO_ORIENTATION = (_SWAP, 0, 0, _SWAP | _INVERT)
_EXACT_TOL = 1e-13  # ST distance to a cell edge / face tie below which a point is recomputed with libm
_POLE_TOL = 1e-9  # degrees; ring vertices this close to ±90 are treated as the pole
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_WORLD = shapely.box(-180.0, -90.0, 180.0, 90.0)
_TOP_LEVEL = 3  # subdivision starts from all 384 level-3 cells (cached polygons)
_U64 = np.uint64


def _init_lookups() -> tuple[np.ndarray, np.ndarray]:
    """The S2 4-level Hilbert tables: iiiijjjj+orientation → pos+orientation and back (1024 entries each)."""
    lookup_pos = np.zeros(1024, dtype=np.int64)
    lookup_ij = np.zeros(1024, dtype=np.int64)
    for base in range(4):
        for pos in range(256):
            ij, orientation = 0, base
            for step in range(4):
                pair = (pos >> ((3 - step) * 2)) & 3
                ij_bits = _POS_TO_IJ[orientation][pair]
                ij = (ij << 1) | ((ij_bits & 2) << 3) | (ij_bits & 1)
                orientation ^= _POS_TO_ORIENTATION[pair]
            lookup_pos[(ij << 2) | base] = (pos << 2) | orientation
            lookup_ij[(pos << 2) | base] = (ij << 2) | orientation
    return lookup_pos, lookup_ij


_LOOKUP_POS, _LOOKUP_IJ = _init_lookups()

# face_uv_to_xyz as a matrix per face: xyz = M[face] @ (u, v, 1)
_FACE_MATRIX = np.array([
    [[0, 0, 1], [1, 0, 0], [0, 1, 0]],     # 0: ( 1,  u,  v)
    [[-1, 0, 0], [0, 0, 1], [0, 1, 0]],    # 1: (-u,  1,  v)
    [[-1, 0, 0], [0, -1, 0], [0, 0, 1]],   # 2: (-u, -v,  1)
    [[0, 0, -1], [0, -1, 0], [-1, 0, 0]],  # 3: (-1, -v, -u)
    [[0, 1, 0], [0, 0, -1], [-1, 0, 0]],   # 4: ( v, -1, -u)
    [[0, 1, 0], [1, 0, 0], [0, 0, -1]],    # 5: ( v,  u, -1)
], dtype=np.float64)


# --------------------------------------------------------------------------------------------- validation


def _check_level(level: int, maximum: int = MAX_LEVEL, name: str = "S2 level") -> int:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level <= maximum:
        raise ValueError(f"{name} must be an integer in 0..{maximum}, got {level!r}")
    return int(level)


def _check_lat_lon(lat_deg: Any, lon_deg: Any) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Broadcast lat/lon to float64, flatten, and reject non-finite values or |lat| > 90 (with counts)."""
    lat, lon = np.broadcast_arrays(np.asarray(lat_deg, dtype=np.float64), np.asarray(lon_deg, dtype=np.float64))
    shape = lat.shape
    lat, lon = lat.ravel(), lon.ravel()
    bad = ~np.isfinite(lat) | ~np.isfinite(lon)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {lat.size} coordinates are NaN or infinite")
    outside = np.abs(lat) > 90.0
    if outside.any():
        raise ValueError(f"{int(outside.sum())} of {lat.size} latitudes are outside [-90, 90] degrees")
    return lat, lon, shape


# --------------------------------------------------------------------------------- lat/lon → face, IJ


def _xyz_numpy(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Unit S2Points, shape (N, 3), with the same operation order as ``s2cell`` (radians = deg * (pi/180))."""
    lat_rad, lon_rad = lat * (math.pi / 180.0), lon * (math.pi / 180.0)
    cos_lat = np.cos(lat_rad)
    return np.stack([cos_lat * np.cos(lon_rad), cos_lat * np.sin(lon_rad), np.sin(lat_rad)], axis=1)


def _xyz_libm(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """``_xyz_numpy`` with :mod:`math` (libm) trig; used only for the few near-boundary points."""
    rows = []
    for la, lo in zip(lat.tolist(), lon.tolist()):
        la_r, lo_r = math.radians(la), math.radians(lo)
        rows.append((math.cos(la_r) * math.cos(lo_r), math.cos(la_r) * math.sin(lo_r), math.sin(la_r)))
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def _uv_to_st(uv: np.ndarray) -> np.ndarray:
    """Quadratic S2 projection, cube-space UV in [-1, 1] → cell-space ST in [0, 1]."""
    with np.errstate(invalid="ignore"):
        return np.where(uv >= 0.0, 0.5 * np.sqrt(1.0 + 3.0 * uv), 1.0 - 0.5 * np.sqrt(1.0 - 3.0 * uv))


def _st_to_uv(st: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_uv_to_st`."""
    return np.where(st >= 0.5, (1.0 / 3.0) * (4.0 * st**2 - 1.0), (1.0 / 3.0) * (1.0 - 4.0 * (1.0 - st) ** 2))


def _xyz_to_face_st(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Face (int64), S, T (float64) and the gap between the two largest |components| (for tie detection)."""
    absolute = np.abs(xyz)
    axis = np.argmax(absolute, axis=1)  # first maximum wins ties, like s2cell's max(enumerate(...))
    rows = np.arange(len(xyz))
    face = axis + 3 * (xyz[rows, axis] < 0.0)
    denominator = xyz[rows, face % 3]
    u = xyz[rows, 1 - ((face + 1) >> 1)] / denominator
    v = xyz[rows, 2 - (face >> 1)] / denominator
    u = np.where(np.isin(face, (1, 2, 5)), -u, u)
    v = np.where(np.isin(face, (2, 4, 5)), -v, v)
    ordered = np.sort(absolute, axis=1)
    return face, _uv_to_st(u), _uv_to_st(v), ordered[:, 2] - ordered[:, 1]


def _near_edge(st: np.ndarray, level: int) -> np.ndarray:
    """True where ST lies within ``_EXACT_TOL`` of a level-``level`` cell edge."""
    scaled = st * float(1 << level)
    return np.abs(scaled - np.round(scaled)) < _EXACT_TOL * float(1 << level)


def _st_to_ij(st: np.ndarray) -> np.ndarray:
    """``floor(2**30 * st)`` clamped to 0..2**30-1, int64."""
    return np.clip(np.floor(_MAX_SIZE * st), 0, _MAX_SIZE - 1).astype(np.int64)


def _lat_lon_to_face_ij(lat: np.ndarray, lon: np.ndarray, level: int) -> tuple[np.ndarray, ...]:
    """Face and leaf IJ for validated flat lat/lon; near-boundary points are redone with libm trig."""
    face, s, t, gap = _xyz_to_face_st(_xyz_numpy(lat, lon))
    risky = np.flatnonzero((gap < _EXACT_TOL) | _near_edge(s, level) | _near_edge(t, level))
    if risky.size:
        face[risky], s[risky], t[risky], _ = _xyz_to_face_st(_xyz_libm(lat[risky], lon[risky]))
    return face, _st_to_ij(s), _st_to_ij(t)


# --------------------------------------------------------------------------------- face, IJ ↔ cell id


def _face_ij_to_cell_id(face: np.ndarray, i: np.ndarray, j: np.ndarray, level: int) -> np.ndarray:
    """Hilbert-curve cell ids (uint64) at ``level`` for face and leaf IJ arrays."""
    bits = (face & _SWAP).astype(np.int64)
    cell = face.astype(np.uint64) << _U64(_POS_BITS - 1)
    steps = math.ceil((level + 2) / 4) if level > 0 else 0
    for k in range(7, 7 - steps, -1):
        bits = bits + (((i >> (4 * k)) & 15) << 6) + (((j >> (4 * k)) & 15) << 2)
        bits = _LOOKUP_POS[bits]
        cell |= (bits >> 2).astype(np.uint64) << _U64(8 * k)
        bits = bits & 3
    cell = cell << _U64(1)
    lsb = _U64(1 << (2 * (MAX_LEVEL - level)))
    return (cell & ~(lsb - _U64(1))) | lsb


def _cell_id_to_face_ij(cell_id: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Face and the IJ of a leaf cell inside each cell (int64 arrays); inverse of the Hilbert encoding."""
    face = (cell_id >> _U64(_POS_BITS)).astype(np.int64)
    bits = face & _SWAP
    i = np.zeros(cell_id.shape, dtype=np.int64)
    j = np.zeros(cell_id.shape, dtype=np.int64)
    for k in range(7, -1, -1):
        mask = _U64(0xF if k == 7 else 0xFF)
        bits = bits + (((cell_id >> _U64(8 * k + 1)) & mask).astype(np.int64) << 2)
        bits = _LOOKUP_IJ[bits]
        i += (bits >> 6) << (4 * k)
        j += ((bits >> 2) & 15) << (4 * k)
        bits = bits & 3
    return face, i, j


def _valid_cell_ids(cell_id: Any) -> np.ndarray:
    """uint64 array of cell ids; ValueError (with count) for zero, bad face or misplaced trailing bit."""
    ids = np.asarray(cell_id).astype(np.uint64)
    lowest = ids & (~ids + _U64(1))
    bad = (ids == 0) | ((ids >> _U64(_POS_BITS)) > 5) | ((lowest & _U64(0x1555555555555555)) == 0)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {ids.size} values are not valid S2 cell ids")
    return ids


def cell_level(cell_id: Any) -> np.ndarray:
    """S2 level (0..30, int64 array of the input's shape) of valid cell ids (uint64 array-like)."""
    ids = _valid_cell_ids(cell_id)
    trailing_zeros = np.bitwise_count((ids & (~ids + _U64(1))) - _U64(1)).astype(np.int64)
    return MAX_LEVEL - (trailing_zeros >> 1)


# ----------------------------------------------------------------------------------- tokens

_NIBBLE = np.full(256, -1, dtype=np.int16)
for _value, _char in enumerate("0123456789abcdef"):
    _NIBBLE[ord(_char)] = _NIBBLE[ord(_char.upper())] = _value


def cell_id_to_token(cell_id: Any) -> np.ndarray:
    """Tokens (object array of str, input shape) for uint64 cell ids: hex without trailing zeros, 0 → "X"."""
    ids = np.asarray(cell_id).astype(np.uint64)
    octets = ids.ravel().astype(">u8").view(np.uint8).reshape(-1, 8)
    nibbles = np.stack([octets >> 4, octets & 15], axis=2).reshape(-1, 16)
    text = np.strings.rstrip(np.ascontiguousarray(_HEX[nibbles]).view("S16").ravel(), b"0")
    tokens = text.astype("U16").astype(object)
    tokens[ids.ravel() == 0] = "X"
    return tokens.reshape(ids.shape)


def token_to_cell_id(token: Any) -> np.ndarray:
    """uint64 cell ids (input shape) for hex tokens (any case, ≤ 16 chars; "X"/"x" → 0). ValueError if malformed."""
    text = np.asarray(token, dtype=str)
    flat = text.ravel()
    lengths = np.strings.str_len(flat)
    bad = (lengths == 0) | (lengths > 16)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {flat.size} tokens are empty or longer than 16 characters")
    try:
        encoded = np.where(np.strings.lower(flat) == "x", "0", flat).astype("S16")
    except UnicodeEncodeError as error:
        raise ValueError("S2 tokens must be ASCII hex strings") from error
    padded = np.strings.ljust(encoded, 16, b"0")
    nibbles = _NIBBLE[np.ascontiguousarray(padded).view(np.uint8).reshape(-1, 16)]
    if (nibbles < 0).any():
        raise ValueError(f"{int((nibbles < 0).any(axis=1).sum())} of {flat.size} tokens contain non-hex characters")
    octets = ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).astype(np.uint8)
    return np.ascontiguousarray(octets).view(">u8").ravel().astype(np.uint64).reshape(text.shape)


# ----------------------------------------------------------------------------------- public point API


def parent_tokens(tokens: Any, level: int) -> np.ndarray:
    """Token at ``level`` of each cell's ancestor (``level`` ≤ each cell's own level). Shape of ``tokens``."""
    ids = token_to_cell_id(np.asarray(tokens, dtype=object)).astype(np.uint64)
    lsb = np.uint64(1) << np.uint64(2 * (MAX_LEVEL - _check_level(level)))
    return np.asarray(cell_id_to_token((ids & ~(lsb * np.uint64(2) - np.uint64(1))) | lsb))


def s2_cell_ids(lat_deg: Any, lon_deg: Any, level: int) -> np.ndarray:
    """S2 cell ids (uint64, broadcast shape of the inputs) at ``level`` for EPSG:4326 lat/lon in degrees."""
    level = _check_level(level)
    lat, lon, shape = _check_lat_lon(lat_deg, lon_deg)
    face, i, j = _lat_lon_to_face_ij(lat, lon, level)
    return _face_ij_to_cell_id(face, i, j, level).reshape(shape)


def s2_tokens(lat_deg: Any, lon_deg: Any, level: int) -> np.ndarray:
    """S2 tokens (object array of str, broadcast shape) at ``level``; equal to ``s2cell.lat_lon_to_token``."""
    return cell_id_to_token(s2_cell_ids(lat_deg, lon_deg, level))


def h3_cells(lat_deg: Any, lon_deg: Any, resolution: int) -> np.ndarray:
    """H3 cell strings (object array, broadcast shape) at ``resolution`` (0..15) for EPSG:4326 degrees."""
    resolution = _check_level(resolution, 15, "H3 resolution")
    lat, lon, shape = _check_lat_lon(lat_deg, lon_deg)
    cells = [h3.latlng_to_cell(la, lo, resolution) for la, lo in zip(lat.tolist(), lon.tolist())]
    return np.array(cells, dtype=object).reshape(shape)


# ----------------------------------------------------------------------------------- cell polygons


def _cell_rings(
    face: np.ndarray, i0: np.ndarray, j0: np.ndarray, size: int, edge_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lon/lat degrees, shape (N, 4 * edge_points), of cells given by face and lower-left leaf IJ (CCW ring)."""
    step = np.arange(edge_points) / edge_points
    zeros, ones = np.zeros(edge_points), np.ones(edge_points)
    di = np.concatenate([step, ones, 1.0 - step, zeros])  # (lo,lo) → (hi,lo) → (hi,hi) → (lo,hi)
    dj = np.concatenate([zeros, step, ones, 1.0 - step])
    u = _st_to_uv((i0[:, None] + size * di[None, :]) / _MAX_SIZE)
    v = _st_to_uv((j0[:, None] + size * dj[None, :]) / _MAX_SIZE)
    xyz = np.einsum("nab,nkb->nka", _FACE_MATRIX[face], np.stack([u, v, np.ones_like(u)], axis=2))
    lat = np.degrees(np.arctan2(xyz[..., 2], np.hypot(xyz[..., 0], xyz[..., 1])))
    lon = np.degrees(np.arctan2(xyz[..., 1], xyz[..., 0]))
    return lon, lat


def _wrap180(delta: np.ndarray | float) -> np.ndarray:
    return (np.asarray(delta) + 180.0) % 360.0 - 180.0


def _special_polygon(lon: np.ndarray, lat: np.ndarray) -> shapely.Geometry:
    """One ring touching a pole, circling it, or crossing ±180 → polygon(s) clipped to the lon/lat world box."""
    at_pole = np.abs(lat) > 90.0 - _POLE_TOL
    if at_pole.any():  # a pole vertex becomes an edge along lat = ±90 between its neighbours' longitudes
        n = len(lon)
        points = []
        for k in range(n):
            if at_pole[k]:
                pole = math.copysign(90.0, lat[k])
                points += [(lon[(k - 1) % n], pole), (lon[(k + 1) % n], pole)]
            else:
                points.append((lon[k], lat[k]))
        lon, lat = np.array(points).T
    lon = np.unwrap(lon, period=360.0)
    closing = lon[-1] + float(_wrap180(lon[0] - lon[-1]))
    if abs(closing - lon[0]) > 180.0:  # ring winds once around a pole (level-0 faces 2 and 5)
        pole = math.copysign(90.0, lat.mean())
        lon, lat = np.r_[lon, closing, closing, lon[0]], np.r_[lat, lat[0], pole, pole]
    ring = shapely.Polygon(np.column_stack([lon, lat]))
    parts = [shapely.intersection(shapely.affinity.translate(ring, xoff=k), _WORLD) for k in (-360.0, 0.0, 360.0)]
    polygons = [g for part in parts for g in shapely.get_parts(part) if g.geom_type == "Polygon" and g.area > 0]
    return shapely.union_all(polygons)


def _rings_to_polygons(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Vectorised shapely polygons from (N, K) rings; rings at a pole or across ±180 take the slow, exact path."""
    jumps = np.abs(np.diff(lon, axis=1, append=lon[:, :1])) > 180.0  # ±180 crossing or circling a pole
    special = jumps.any(axis=1) | (np.abs(lat) > 90.0 - _POLE_TOL).any(axis=1)
    polygons = np.empty(len(lon), dtype=object)
    normal = ~special
    if normal.any():
        polygons[normal] = shapely.polygons(np.stack([lon[normal], lat[normal]], axis=2))
    for row in np.flatnonzero(special):
        polygons[row] = _special_polygon(lon[row], lat[row])
    return polygons


def _cell_polygons(face: np.ndarray, i0: np.ndarray, j0: np.ndarray, level: int, edge_points: int) -> np.ndarray:
    lon, lat = _cell_rings(face, i0, j0, 1 << (MAX_LEVEL - level), edge_points)
    return _rings_to_polygons(lon, lat)


def s2_cell_polygon(token: str, edge_points: int = 4) -> shapely.Polygon | shapely.MultiPolygon:
    """EPSG:4326 lon/lat polygon of one S2 cell: corners plus ``edge_points - 1`` extra points per edge.

    Edges are sampled along the cell's great-circle edges. Only the level-0 face 3 crosses ±180 (a MultiPolygon
    split there); cells touching a pole have an edge along lat = ±90.
    """
    if isinstance(edge_points, bool) or not isinstance(edge_points, (int, np.integer)) or edge_points < 1:
        raise ValueError(f"edge_points must be an integer >= 1, got {edge_points!r}")
    ids = _valid_cell_ids(token_to_cell_id(np.array([token])))
    level = int(cell_level(ids)[0])
    face, i, j = _cell_id_to_face_ij(ids)
    cell_mask = ~np.int64((1 << (MAX_LEVEL - level)) - 1)
    return _cell_polygons(face, i & cell_mask, j & cell_mask, level, int(edge_points))[0]


# ----------------------------------------------------------------------------------- coverings


def _children(face: np.ndarray, i0: np.ndarray, j0: np.ndarray, level: int) -> tuple[np.ndarray, ...]:
    """The four level-``level`` children (face, lower-left IJ) of each level-``level - 1`` cell."""
    half = 1 << (MAX_LEVEL - level)
    di, dj = np.array([0, half, 0, half]), np.array([0, 0, half, half])
    return np.repeat(face, 4), (i0[:, None] + di).ravel(), (j0[:, None] + dj).ravel()


def _point_cells(geometry: shapely.Geometry, level: int) -> np.ndarray:
    """Cell ids of every coordinate of ``geometry`` (x = lon, y = lat)."""
    coords = shapely.get_coordinates(geometry)
    return s2_cell_ids(coords[:, 1], coords[:, 0], level)


def _margins(polygons: np.ndarray) -> np.ndarray:
    """Pruning tolerance per cell polygon: 5 % of its larger bbox side (degrees), absorbs edge approximation."""
    bounds = shapely.bounds(polygons)
    return 0.05 * np.maximum(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1])


def s2_covering(geometry: shapely.Geometry, level: int, max_cells: int = 100_000) -> list[str]:
    """Sorted tokens of every level-``level`` S2 cell whose polygon intersects ``geometry`` (EPSG:4326 lon/lat).

    Points give their own cells. Other geometries: subdivision from the six faces, pruning cells that are
    farther than a small tolerance from the geometry, then an exact ``intersects`` at ``level`` with the
    :func:`s2_cell_polygon` polygons; the cells of all the geometry's vertices are always included. Raises
    ValueError when more than ``max_cells`` cells are needed (checked at every level, so it fails fast).
    """
    level = _check_level(level)
    if geometry is None or shapely.is_empty(geometry):
        return []
    if shapely.get_type_id(geometry) in (0, 4):  # Point, MultiPoint
        ids = _point_cells(geometry, level)
    else:
        ids = np.union1d(_subdivide(_valid_geometry(geometry), level, max_cells), _point_cells(geometry, level))
    ids = np.unique(ids)
    if ids.size > max_cells:
        raise ValueError(f"S2 covering at level {level} needs {ids.size} cells, more than max_cells={max_cells}")
    return cell_id_to_token(ids).tolist()


def _valid_geometry(geometry: shapely.Geometry) -> shapely.Geometry:
    geometry = geometry if shapely.is_valid(geometry) else shapely.make_valid(geometry)
    shapely.prepare(geometry)
    return geometry


def _subdivide(geometry: shapely.Geometry, level: int, max_cells: int) -> np.ndarray:
    """Cell ids at ``level`` whose polygons intersect the (prepared) geometry, by pruned recursive subdivision."""
    current = min(level, _TOP_LEVEL)
    face, i0, j0, polygons, margins = _top_cells(current, 4 if current == level else 8)
    while True:
        if current == level:
            keep = shapely.intersects(polygons, geometry)
        else:
            keep = shapely.dwithin(polygons, geometry, margins)
        face, i0, j0 = face[keep], i0[keep], j0[keep]
        if face.size > max_cells:
            raise ValueError(
                f"S2 covering at level {level} needs more than max_cells={max_cells} cells "
                f"({face.size} already at level {current})"
            )
        if current == level:
            return _face_ij_to_cell_id(face, i0, j0, level)
        current += 1
        face, i0, j0 = _children(face, i0, j0, current)
        polygons = _cell_polygons(face, i0, j0, current, 4 if current == level else 8)
        margins = _margins(polygons)


@functools.cache
def _top_cells(level: int, edge_points: int) -> tuple[np.ndarray, ...]:
    """All cells at a coarse level (face, i0, j0, polygons, pruning margins); cached, the polar/±180 ones are slow."""
    face, i0, j0 = np.arange(6), np.zeros(6, dtype=np.int64), np.zeros(6, dtype=np.int64)
    for current in range(1, level + 1):
        face, i0, j0 = _children(face, i0, j0, current)
    polygons = _cell_polygons(face, i0, j0, level, edge_points)
    return face, i0, j0, polygons, _margins(polygons)


# ----------------------------------------------------------------------------------- large coverings (interior test)


def parent_cell_ids(cell_id: Any, level: int) -> np.ndarray:
    """uint64 ids of each cell's level-``level`` ancestor (``level`` ≤ each cell's own level). Input shape."""
    ids = np.asarray(cell_id).astype(np.uint64)
    lsb = _U64(1 << (2 * (MAX_LEVEL - _check_level(level))))
    return (ids & ~(lsb * _U64(2) - _U64(1))) | lsb


def descendant_cell_ids(cell_id: Any, from_level: int, level: int) -> np.ndarray:
    """Sorted-per-parent uint64 ids of every level-``level`` descendant of the level-``from_level`` cells (1-D)."""
    ids = np.asarray(cell_id).astype(np.uint64).ravel()
    lsb_from, lsb_to = _U64(1 << (2 * (MAX_LEVEL - from_level))), _U64(1 << (2 * (MAX_LEVEL - level)))
    offsets = np.arange(4 ** (level - from_level), dtype=np.uint64) * (lsb_to * _U64(2))
    return ((ids - lsb_from + lsb_to)[:, None] + offsets[None, :]).ravel()


def _sorted_unique(ids: np.ndarray) -> np.ndarray:
    """``np.unique`` by sort + neighbour test (numpy's hash-based unique is slow on millions of uint64)."""
    ids = np.sort(ids.astype(np.uint64).ravel())
    return ids[np.r_[True, ids[1:] != ids[:-1]]] if ids.size else ids


def _edges(geometry: shapely.Geometry) -> shapely.Geometry:
    """Where a cell stops being inside: the boundary of the polygonal parts plus every non-polygonal part."""
    parts = shapely.get_parts(geometry)
    polygonal = np.isin(shapely.get_type_id(parts), (3, 6))
    edges = shapely.union_all(np.concatenate([shapely.boundary(parts[polygonal]), parts[~polygonal]]))
    shapely.prepare(edges)
    return edges


def s2_covering_ids(geometry: shapely.Geometry, level: int, max_cells: int = 5_000_000) -> np.ndarray:
    """Sorted uint64 ids of the same level-``level`` cells as :func:`s2_covering`, fast for country-sized AOIs.

    Subdivision as in :func:`s2_covering`, plus an interior test at every coarser level: a cell within the
    pruning tolerance of the geometry but not of its edges lies inside it, so all its level-``level``
    descendants are taken by id arithmetic instead of being subdivided. Work grows with the AOI's perimeter,
    not its area (Germany at level 14, ~1.1e6 cells: about a second). ValueError above ``max_cells`` cells.
    """
    level = _check_level(level)
    if geometry is None or shapely.is_empty(geometry):
        return np.empty(0, dtype=np.uint64)
    if shapely.get_type_id(geometry) in (0, 4):
        ids = _point_cells(geometry, level)
    else:
        ids = np.concatenate([_subdivide_interior(_valid_geometry(geometry), level, max_cells),
                              _point_cells(geometry, level)])
    ids = _sorted_unique(ids)
    if ids.size > max_cells:
        raise ValueError(f"S2 covering at level {level} needs {ids.size} cells, more than max_cells={max_cells}")
    return ids


def _subdivide_interior(geometry: shapely.Geometry, level: int, max_cells: int) -> np.ndarray:
    """Cell ids at ``level`` intersecting the prepared geometry: interior cells expanded, edge cells subdivided."""
    current = min(level, _TOP_LEVEL)
    face, i0, j0, polygons, margins = _top_cells(current, 4 if current == level else 8)
    edges, inside_ids, inside_count = _edges(geometry), [], 0
    while current < level:
        near = shapely.dwithin(polygons, geometry, margins)
        inside = near & ~shapely.dwithin(polygons, edges, margins)
        if inside.any():
            inside_ids.append(descendant_cell_ids(_face_ij_to_cell_id(face[inside], i0[inside], j0[inside], current),
                                                  current, level))
            inside_count += inside_ids[-1].size
        face, i0, j0 = face[near & ~inside], i0[near & ~inside], j0[near & ~inside]
        if inside_count + face.size > max_cells:
            raise ValueError(f"S2 covering at level {level} needs more than max_cells={max_cells} cells "
                             f"({inside_count} inside and {face.size} on the edge at level {current})")
        current += 1
        face, i0, j0 = _children(face, i0, j0, current)
        polygons = _cell_polygons(face, i0, j0, current, 4 if current == level else 8)
        margins = _margins(polygons)
    keep = shapely.intersects(polygons, geometry)
    edge_ids = _face_ij_to_cell_id(face[keep], i0[keep], j0[keep], level)
    return np.concatenate([edge_ids, *inside_ids]) if inside_ids else edge_ids
