"""Georeferencing helpers: named-tile grids, pixel <-> lon/lat, ground sample distance, chip reprojection.

Pixel coordinates follow rasterio: ``(col, row)`` with integers at pixel *corners*, so a pixel's centre is
``(col + 0.5, row + 0.5)``; ``transform @ (col, row)`` gives ``crs`` coordinates. Lon/lat are EPSG:4326 degrees
in (x = lon, y = lat) order (pyproj ``always_xy``).

Two file-name conventions carry a tile's centre (no georeference inside the file); :func:`named_tile_grid`
derives a north-up grid from them. Both are approximations, so chips built on them set ``georeferenced=False``.

* **Jiang PV01** (``PV01_<lat*1e4>_<lon*1e4>.bmp``, e.g. ``PV01_324942_1203839`` = 32.4942 N, 120.3839 E):
  UAV tiles, 256x256 px at 0.1 m. Grid: the local UTM zone (EPSG:326xx north / 327xx south, zone from the
  centre longitude), centre projected, 0.1 m square pixels, rows pointing south. Uncertainty: the name keeps
  1e-4 degree (about 11 m in latitude, 9.4 m in longitude at 32 N), larger than a third of the 25.6 m tile, so
  the footprint can be off by up to ~11 m (5.5 m if the names were rounded rather than truncated). The tile
  orientation is assumed north-up; UTM grid north differs from true north by the meridian convergence
  (~1.4 degrees at 120.4 E in zone 51, i.e. < 0.4 m at the tile edge), negligible next to the name precision.
* **Google Static Maps** (``<lat>_<lon>.png``, the NREL Austin tiles): zoom 19, scale 1, 640x640 px centred on
  the named point. Grid: EPSG:3857 (Web Mercator) with ``156543.03392804097 / 2**19`` projected metres per
  pixel (about 0.2986 m), centred on the projected centre; the ground GSD is that times cos(lat) (about
  0.258 m at 30.3 N). Adjacent Austin tiles computed this way overlap their image content to within 0.5 px
  (see ``tests/test_vhr_geo.py``); the absolute accuracy is that of the Google imagery, which is not known.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from affine import Affine
from pyproj import Geod, Transformer
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds

from aegir.utils.types import Chip

if TYPE_CHECKING:
    import shapely

JIANG_GSD_M = 0.1
JIANG_TILE_PX = 256
JIANG_NAME_PRECISION_DEG = 1e-4
GOOGLE_ZOOM = 19
GOOGLE_TILE_PX = 640
WEB_MERCATOR_Z0_M_PER_PX = 156543.03392804097  # 2*pi*6378137 / 256: EPSG:3857 metres per pixel at zoom 0
WGS84 = CRS.from_epsg(4326)
WEB_MERCATOR = CRS.from_epsg(3857)
PIXEL_GRID_CRS = CRS.from_wkt(
    'LOCAL_CS["image pixel grid (not georeferenced)",LOCAL_DATUM["image",0],UNIT["metre",1],'
    'AXIS["X",EAST],AXIS["Y",SOUTH]]'
)

_GEOD = Geod(ellps="WGS84")
_JIANG_RE = re.compile(r"^(?P<prefix>PV\d+)_(?P<lat>-?\d+)_(?P<lon>-?\d+)$", re.IGNORECASE)
_LATLON_RE = re.compile(r"^(?P<lat>-?\d+(?:\.\d+)?)_(?P<lon>-?\d+(?:\.\d+)?)$")

TileConvention = Literal["jiang_pv01", "google_static_z19"]


def geodesic_area_m2(geometry_lonlat: np.ndarray) -> np.ndarray:
    """(N,) float64 area in m² on the WGS84 ellipsoid of (N,) shapely geometries in EPSG:4326 (points and lines
    count 0; polygon orientation does not matter): the signed geodesic areas of the rings (shells
    counter-clockwise, holes clockwise) summed per geometry."""
    import shapely

    geometry = np.asarray(geometry_lonlat, dtype=object)
    parts, owner = shapely.get_parts(shapely.orient_polygons(geometry), return_index=True)
    polygons = shapely.get_type_id(parts) == shapely.GeometryType.POLYGON
    rings, ring_part = shapely.get_rings(parts[polygons], return_index=True)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    starts = np.searchsorted(ring_of, np.arange(len(rings) + 1))
    signed = np.array([_GEOD.polygon_area_perimeter(coords[a:b, 0], coords[a:b, 1])[0]
                       for a, b in itertools.pairwise(starts)], dtype=np.float64)
    ring_owner = owner[polygons][ring_part]
    return np.abs(np.bincount(ring_owner, weights=signed, minlength=len(geometry))) if len(rings) else \
        np.zeros(len(geometry))


@dataclass(frozen=True)
class TileName:
    """A tile's centre parsed from its file name: ``lat``/``lon`` in EPSG:4326 degrees."""

    convention: TileConvention
    lat: float
    lon: float
    stem: str
    prefix: str | None = None


@dataclass(frozen=True)
class TileGrid:
    """A raster grid: ``transform`` maps (col, row) pixel corners to ``crs``; ``gsd_m`` is the ground GSD (m)."""

    crs: CRS
    transform: Affine
    width: int
    height: int
    gsd_m: float
    convention: str
    position_uncertainty_m: float | None = None


def parse_tile_name(path: str | Path) -> TileName:
    """Parse a Jiang PV01 (``PV01_<lat*1e4>_<lon*1e4>``) or Google-static (``<lat>_<lon>``) tile file name.

    Raises ValueError naming the file when neither convention matches or the centre is off the globe.
    """
    stem = Path(path).stem
    if match := _JIANG_RE.match(stem):
        tile = TileName("jiang_pv01", int(match["lat"]) * JIANG_NAME_PRECISION_DEG,
                        int(match["lon"]) * JIANG_NAME_PRECISION_DEG, stem, match["prefix"].upper())
    elif match := _LATLON_RE.match(stem):
        tile = TileName("google_static_z19", float(match["lat"]), float(match["lon"]), stem)
    else:
        raise ValueError(
            f"{path}: file name {stem!r} is neither a Jiang PV01 tile name 'PV01_<lat*1e4>_<lon*1e4>' "
            "nor a Google static-map tile name '<lat>_<lon>'"
        )
    if not (-90.0 <= tile.lat <= 90.0 and -180.0 <= tile.lon <= 180.0):
        raise ValueError(f"{path}: centre lat={tile.lat}, lon={tile.lon} parsed from the name is off the globe")
    return tile


def utm_crs(lon: float, lat: float) -> CRS:
    """The WGS84 UTM zone CRS (EPSG:326zz north of the equator, 327zz south) containing ``lon``/``lat``."""
    zone = min(int(math.floor((lon + 180.0) / 6.0)) + 1, 60)
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def web_mercator_m_per_px(zoom: int) -> float:
    """EPSG:3857 projected metres per pixel of a 256-px-tile web map at ``zoom`` (scale 1)."""
    return WEB_MERCATOR_Z0_M_PER_PX / 2**zoom


def _centred_grid(crs: CRS, lon: float, lat: float, pixel_size: float, width: int, height: int) -> Affine:
    """North-up transform whose pixel-corner grid is centred on (lon, lat) projected to ``crs``."""
    x, y = Transformer.from_crs(WGS84, crs, always_xy=True).transform(lon, lat)
    return Affine(pixel_size, 0.0, x - width / 2 * pixel_size, 0.0, -pixel_size, y + height / 2 * pixel_size)


def named_tile_grid(tile: TileName, width: int | None = None, height: int | None = None) -> TileGrid:
    """The grid a tile name implies (see the module docstring); ``width``/``height`` default to the convention's."""
    if tile.convention == "jiang_pv01":
        width, height = width or JIANG_TILE_PX, height or JIANG_TILE_PX
        crs = utm_crs(tile.lon, tile.lat)
        transform = _centred_grid(crs, tile.lon, tile.lat, JIANG_GSD_M, width, height)
        lat_step_m = JIANG_NAME_PRECISION_DEG * 111_320.0
        return TileGrid(crs, transform, width, height, JIANG_GSD_M, "jiang_pv01_name_centre_utm", lat_step_m)
    width, height = width or GOOGLE_TILE_PX, height or GOOGLE_TILE_PX
    m_per_px = web_mercator_m_per_px(GOOGLE_ZOOM)
    transform = _centred_grid(WEB_MERCATOR, tile.lon, tile.lat, m_per_px, width, height)
    gsd = m_per_px * math.cos(math.radians(tile.lat))
    return TileGrid(WEB_MERCATOR, transform, width, height, gsd, "google_static_z19_name_centre_webmercator", None)


@functools.lru_cache(maxsize=256)
def _transformer(src: str, dst: str) -> Transformer:
    """A cached always-xy Transformer between two CRSs given as WKT / user-input text."""
    return Transformer.from_crs(src, dst, always_xy=True)


def _crs_key(crs: CRS | str) -> str:
    return crs if isinstance(crs, str) else crs.to_wkt()


def pixel_to_lonlat(
    transform: Affine, crs: CRS, col: float | np.ndarray, row: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lon/lat (EPSG:4326 degrees) of pixel coordinates (col, row); integers are corners, +0.5 the centre."""
    x, y = transform @ (np.asarray(col, dtype=np.float64), np.asarray(row, dtype=np.float64))
    lon, lat = _transformer(_crs_key(crs), _crs_key(WGS84)).transform(x, y)
    return np.asarray(lon), np.asarray(lat)


def lonlat_to_pixel(
    transform: Affine, crs: CRS | str, lon: float | np.ndarray, lat: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fractional pixel coordinates (col, row) of EPSG:4326 lon/lat on the grid (``transform``, ``crs``)."""
    x, y = _transformer(_crs_key(WGS84), _crs_key(crs)).transform(
        np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
    )
    col, row = ~transform @ (np.asarray(x), np.asarray(y))
    return np.asarray(col), np.asarray(row)


def ground_gsd_m(transform: Affine, crs: CRS, width: int, height: int) -> float:
    """Geodesic length (m, WGS84) of one pixel step along a row at the grid centre: the ground GSD."""
    col, row = width / 2.0, height / 2.0
    lon, lat = pixel_to_lonlat(transform, crs, np.array([col, col + 1.0]), np.array([row, row]))
    return float(_GEOD.inv(lon[0], lat[0], lon[1], lat[1])[2])


def pixel_size_for_gsd(crs: CRS, gsd_m: float, lat: float) -> float:
    """Pixel size in ``crs`` units for a GSD of ``gsd_m``: metres as is; degrees (of longitude) at ``lat``."""
    if not crs.is_geographic:
        return gsd_m
    return gsd_m / (111_320.0 * max(math.cos(math.radians(lat)), 1e-6))


def warp_chip_to_grid(
    chip: Chip, dst_crs: CRS, dst_transform: Affine, width: int, height: int,
    resampling: Resampling | str = Resampling.bilinear,
) -> Chip:
    """``chip`` warped onto the given grid (rasterio.warp.reproject); outside/invalid source pixels → invalid, 0.

    The valid mask is warped with nearest neighbour; invalid source pixels are kept out of the resampling
    kernels. The result's ``gsd_m`` is the measured ground GSD of the new grid.
    """
    if chip.crs == PIXEL_GRID_CRS:
        raise ValueError(f"{chip.source}: chip is on a bare pixel grid (no georeference); cannot reproject it")
    resampling = Resampling[resampling] if isinstance(resampling, str) else resampling
    src_valid = np.ones(chip.pixels.shape[1:], np.uint8) if chip.valid is None else chip.valid.astype(np.uint8)
    src = chip.pixels if chip.valid is None else np.where(chip.valid, chip.pixels, 0).astype(chip.pixels.dtype)
    dst = np.zeros((chip.pixels.shape[0], height, width), dtype=chip.pixels.dtype)
    valid = np.zeros((height, width), dtype=np.uint8)
    common = dict(src_transform=chip.transform, src_crs=chip.crs, dst_transform=dst_transform, dst_crs=dst_crs)
    src_nodata = None if chip.valid is None else 0
    reproject(src, dst, resampling=resampling, src_nodata=src_nodata, dst_nodata=0, **common)
    reproject(src_valid, valid, resampling=Resampling.nearest, src_nodata=None, dst_nodata=0, **common)
    valid_mask = valid.astype(bool)
    return Chip(
        pixels=np.where(valid_mask, dst, 0).astype(dst.dtype),
        crs=dst_crs,
        transform=dst_transform,
        gsd_m=ground_gsd_m(dst_transform, dst_crs, width, height),
        bands=chip.bands,
        source=chip.source,
        valid=None if valid_mask.all() else valid_mask,
        sensor=chip.sensor,
        acquired_at=chip.acquired_at,
        georeferenced=chip.georeferenced,
        extras={**chip.extras, "reprojected_from": chip.crs.to_string()},
    )


def reproject_chip(
    chip: Chip, dst_crs: CRS | str, dst_gsd_m: float, resampling: Resampling | str = Resampling.bilinear
) -> Chip:
    """``chip`` warped onto a north-up grid in ``dst_crs`` with square pixels covering the chip's footprint.

    ``dst_gsd_m`` is the pixel size in the destination's linear unit when that is the metre (UTM; for EPSG:3857
    these are projected metres, ground = x cos(lat)); for geographic CRSs it is converted to degrees at the
    chip centre. See :func:`warp_chip_to_grid` for the handling of invalid pixels.
    """
    if chip.crs == PIXEL_GRID_CRS:
        raise ValueError(f"{chip.source}: chip is on a bare pixel grid (no georeference); cannot reproject it")
    dst_crs = CRS.from_user_input(dst_crs)
    _, lat = pixel_to_lonlat(chip.transform, chip.crs, chip.width / 2.0, chip.height / 2.0)
    size = pixel_size_for_gsd(dst_crs, dst_gsd_m, float(lat))
    left, bottom, right, top = transform_bounds(chip.crs, dst_crs, *chip.bounds, densify_pts=21)
    width = max(math.ceil(round((right - left) / size, 6)), 1)
    height = max(math.ceil(round((top - bottom) / size, 6)), 1)
    dst_transform = Affine(size, 0.0, left, 0.0, -size, top)
    return warp_chip_to_grid(chip, dst_crs, dst_transform, width, height, resampling)


def grid_bounds(transform: Affine, width: int, height: int) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a ``width`` × ``height`` px grid, in its CRS units."""
    left, top = transform @ (0, 0)
    right, bottom = transform @ (width, height)
    return (min(left, right), min(bottom, top), max(left, right), max(bottom, top))


def footprint_lonlat(crs: CRS, bounds: tuple[float, float, float, float]) -> shapely.Geometry:
    """The box ``bounds`` (left, bottom, right, top in ``crs``) as an EPSG:4326 polygon, edges densified."""
    import shapely
    from rasterio.warp import transform_geom

    box = shapely.geometry.mapping(shapely.box(*bounds))
    return shapely.geometry.shape(transform_geom(crs, "EPSG:4326", box))


def chip_footprint_wkb(chip: Chip) -> bytes:
    """The chip's footprint polygon as WKB in EPSG:4326 (lon/lat), edges densified by the CRS transformation."""
    import shapely

    return shapely.to_wkb(footprint_lonlat(chip.crs, chip.bounds))


def label_polygons(labels: np.ndarray, transform: Affine, crs: CRS) -> tuple[np.ndarray, np.ndarray]:
    """Polygons of the labelled regions of ``labels`` ((H, W) int, 0 = background) on the grid (``transform``,
    ``crs``), in EPSG:4326: (values (N,) int64 ascending, geometries (N,) shapely (Multi)Polygons)."""
    import shapely
    from rasterio.features import shapes

    parts: dict[int, list] = {}
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    for geometry, value in shapes(labels, mask=labels > 0, transform=transform, connectivity=4):
        parts.setdefault(int(value), []).append(shapely.geometry.shape(geometry))
    values = np.array(sorted(parts), dtype=np.int64)
    geometries = np.empty(len(values), dtype=object)
    geometries[:] = [parts[v][0] if len(parts[v]) == 1 else shapely.union_all(parts[v]) for v in values]
    to_lonlat = Transformer.from_crs(crs, WGS84, always_xy=True)
    return values, shapely.transform(geometries, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1])))


def chip_centred_on(tile: Chip, point_lonlat, size_px: int) -> Chip:
    """A ``size_px``² window of ``tile`` whose centre pixel holds ``point_lonlat`` (a shapely Point, EPSG:4326).

    Parts outside the tile are zero and marked invalid; the window keeps the tile's CRS with its own transform.
    """
    import dataclasses

    col, row = lonlat_to_pixel(tile.transform, tile.crs, point_lonlat.x, point_lonlat.y)
    col0, row0 = int(np.floor(col)) - size_px // 2, int(np.floor(row)) - size_px // 2
    pixels = np.zeros((tile.pixels.shape[0], size_px, size_px), dtype=tile.pixels.dtype)
    valid = np.zeros((size_px, size_px), dtype=bool)
    src_rows = slice(max(row0, 0), min(row0 + size_px, tile.height))
    src_cols = slice(max(col0, 0), min(col0 + size_px, tile.width))
    dst = (slice(src_rows.start - row0, src_rows.stop - row0), slice(src_cols.start - col0, src_cols.stop - col0))
    pixels[(slice(None), *dst)] = tile.pixels[:, src_rows, src_cols]
    tile_valid = np.ones((tile.height, tile.width), bool) if tile.valid is None else tile.valid
    valid[dst] = tile_valid[src_rows, src_cols]
    return dataclasses.replace(tile, pixels=pixels, valid=None if valid.all() else valid,
                               transform=tile.transform @ Affine.translation(col0, row0))


def chip_window(tile: Chip, col: int, row: int, size_px: int) -> Chip:
    """The ``size_px``² window of ``tile`` whose top-left pixel is (``col``, ``row``); parts outside the tile are
    zero and marked invalid; the window keeps the tile's CRS with its own transform."""
    import dataclasses

    pixels = np.zeros((tile.pixels.shape[0], size_px, size_px), dtype=tile.pixels.dtype)
    part = tile.pixels[:, row : row + size_px, col : col + size_px]
    pixels[:, : part.shape[1], : part.shape[2]] = part
    valid = np.zeros((size_px, size_px), dtype=bool)
    tile_valid = np.ones((tile.height, tile.width), bool) if tile.valid is None else tile.valid
    valid[: part.shape[1], : part.shape[2]] = tile_valid[row : row + size_px, col : col + size_px]
    return dataclasses.replace(tile, pixels=pixels, valid=None if valid.all() else valid,
                               transform=tile.transform @ Affine.translation(col, row), extras={})


def burn_polygons(chip: Chip, polygons_wkb: list[bytes]) -> np.ndarray | None:
    """(H, W) uint8 0/1 mask of the (EPSG:4326, WKB) polygons on the chip grid; None when none is areal."""
    import shapely
    from rasterio.features import rasterize
    from rasterio.warp import transform_geom

    polygons = [g for g in shapely.from_wkb(polygons_wkb) if shapely.get_dimensions(g) == 2]
    if not polygons:
        return None
    shapes = [transform_geom("EPSG:4326", chip.crs, shapely.geometry.mapping(g)) for g in polygons]
    return rasterize(shapes, out_shape=(chip.height, chip.width), transform=chip.transform, fill=0,
                     default_value=1, dtype="uint8")


def chip_centre_lonlat(chip: Chip) -> tuple[float, float]:
    """(lon, lat) of the chip's centre pixel corner (W / 2, H / 2), EPSG:4326."""
    lon, lat = pixel_to_lonlat(chip.transform, chip.crs, np.array([chip.width / 2]), np.array([chip.height / 2]))
    return float(np.asarray(lon)[0]), float(np.asarray(lat)[0])


def with_sample(chip: Chip, sample_id: str, provenance: dict | None = None) -> Chip:
    """The chip as a ``training_data`` sample: ``extras`` sample_id, prompt_wkb (its footprint, EPSG:4326 WKB)
    and per-sample ``provenance`` (merged into the row's ``params_json``)."""
    import dataclasses

    extras = {"sample_id": sample_id, "prompt_wkb": chip_footprint_wkb(chip), "provenance": dict(provenance or {})}
    return dataclasses.replace(chip, extras=extras)
