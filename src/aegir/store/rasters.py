"""Raster readers: VHR chips from GeoTIFF/COG windows and named PNG/BMP tiles (STAC catalogs: :mod:`.stac`).

Every public function is named for what it returns and its parameters for what they are, so the readers compose
as Hamilton loader nodes (``tests/test_vhr_loaders.py`` runs them as one DAG).
All loaders return :class:`aegir.utils.types.Chip` (pixels (C, H, W) in the file's dtype, rasterio CRS and
Affine transform, ground GSD in metres, ``valid`` (H, W) mask or None when every pixel is valid).

* **GeoTIFF / COG** (any path or URL rasterio opens): only the requested window is read
  (``rasterio.windows.from_bounds`` or a centre point + size), never the full scene. Windows reaching past
  the raster are read boundless and the outside marked invalid; the dataset's nodata value or internal mask
  becomes ``valid``. Bands are chosen by 1-based index or by name (band description, STAC ``eo:bands`` name,
  or colour interpretation such as ``red``); an optional target CRS / GSD warps the window
  (``rasterio.warp.reproject``) from a source window padded to cover the whole target grid.
* **Named tiles** (Jiang PV01 BMP, NREL/Google Austin PNG): the grid comes from the file when it has one,
  otherwise from the file-name convention (:mod:`aegir.utils.geo`, ``georeferenced=False``). A tile with
  neither is an error naming the file, unless ``allow_unnamed_tiles`` asks for a bare pixel grid
  (``crs=geo.PIXEL_GRID_CRS``, identity transform, ``gsd_m`` NaN, ``georeferenced=False``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.enums import MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds

from aegir.utils import geo
from aegir.utils.types import Chip

_COLOR_NAMES = {"red", "green", "blue", "alpha", "gray", "grey", "pan"}
TILE_SENSORS = {"jiang_pv01": "uav-rgb", "google_static_z19": "aerial-rgb"}


@dataclass(frozen=True)
class RasterWindow:
    """A window request in ``crs``: ``bounds`` (left, bottom, right, top), or ``center`` (x, y) + ``size_px``.

    With a centre, the pixel containing the centre point lands at (row, col) = (height // 2, width // 2).
    """

    crs: CRS
    bounds: tuple[float, float, float, float] | None = None
    center: tuple[float, float] | None = None
    size_px: tuple[int, int] | None = None  # (width, height) in output pixels


def raster_window(
    window_bounds: Sequence[float] | None = None,
    window_center: Sequence[float] | None = None,
    window_size_px: Sequence[int] | None = None,
    window_crs: str = "EPSG:4326",
) -> RasterWindow:
    """The window to read: ``window_bounds`` (left, bottom, right, top) or ``window_center`` (x, y) plus
    ``window_size_px`` (width, height), coordinates in ``window_crs`` (lon/lat by default)."""
    crs = CRS.from_user_input(window_crs)
    if (window_bounds is None) == (window_center is None):
        raise ValueError("give exactly one of window_bounds (left, bottom, right, top) or window_center (x, y)")
    if window_bounds is not None:
        left, bottom, right, top = (float(v) for v in window_bounds)
        if not (right > left and top > bottom):
            raise ValueError(f"window_bounds {tuple(window_bounds)} must be (left, bottom, right, top), non-empty")
        return RasterWindow(crs, bounds=(left, bottom, right, top))
    if window_size_px is None or len(window_size_px) != 2 or min(window_size_px) < 1:
        raise ValueError(f"window_center needs window_size_px (width, height) >= 1, got {window_size_px}")
    x, y = (float(v) for v in window_center)
    return RasterWindow(crs, center=(x, y), size_px=(int(window_size_px[0]), int(window_size_px[1])))


def dataset_band_names(dataset: rasterio.io.DatasetReader) -> list[str]:
    """Band names: the description, else a colour name (red/green/blue/...), else ``band<i>`` (1-based)."""
    names = []
    for index, (description, interp) in enumerate(zip(dataset.descriptions, dataset.colorinterp), start=1):
        if description:
            names.append(description)
        elif interp.name in _COLOR_NAMES:
            names.append(interp.name)
        else:
            names.append(f"band{index}")
    return names


def _band_indexes(source: str, names: Sequence[str], selection: Sequence[int | str] | None) -> list[int]:
    """1-based band indexes for ``selection`` (indexes or case-insensitive names); all bands when None."""
    if selection is None:
        return list(range(1, len(names) + 1))
    lowered = [name.lower() for name in names]
    indexes = []
    for item in selection:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 1 <= int(item) <= len(names):
                raise ValueError(f"{source}: band index {item} out of range 1..{len(names)}")
            indexes.append(int(item))
        elif isinstance(item, str) and item.lower() in lowered:
            indexes.append(lowered.index(item.lower()) + 1)
        else:
            raise ValueError(f"{source}: no band {item!r}; bands are {list(names)} (or 1-based indexes)")
    return indexes


def window_lonlat_bounds(request: RasterWindow) -> tuple[float, float, float, float]:
    """The request's extent in EPSG:4326 (a degenerate box for a centre request)."""
    if request.bounds is not None:
        return transform_bounds(request.crs, geo.WGS84, *request.bounds, densify_pts=21)
    xs, ys = warp_transform(request.crs, geo.WGS84, [request.center[0]], [request.center[1]])
    return (xs[0], ys[0], xs[0], ys[0])


def _snap_outward(window: Window) -> Window:
    """Integer window covering ``window`` (offsets floored, ends ceiled, float noise ignored)."""
    col0 = math.floor(round(window.col_off, 6))
    row0 = math.floor(round(window.row_off, 6))
    col1 = math.ceil(round(window.col_off + window.width, 6))
    row1 = math.ceil(round(window.row_off + window.height, 6))
    return Window(col0, row0, max(col1 - col0, 1), max(row1 - row0, 1))


def _native_window(dataset: rasterio.io.DatasetReader, request: RasterWindow) -> Window:
    """The request as an integer window on the dataset's own grid."""
    if request.bounds is not None:
        bounds = transform_bounds(request.crs, dataset.crs, *request.bounds, densify_pts=21)
        return _snap_outward(from_bounds(*bounds, transform=dataset.transform))
    xs, ys = warp_transform(request.crs, dataset.crs, [request.center[0]], [request.center[1]])
    col, row = ~dataset.transform @ (xs[0], ys[0])
    width, height = request.size_px
    return Window(math.floor(col) - width // 2, math.floor(row) - height // 2, width, height)


def _target_grid(request: RasterWindow, dst_crs: CRS, gsd_m: float) -> tuple[Affine, int, int]:
    """North-up grid in ``dst_crs`` with ``gsd_m`` pixels covering the request: (transform, width, height)."""
    lon0, lat0, lon1, lat1 = window_lonlat_bounds(request)
    size = geo.pixel_size_for_gsd(dst_crs, gsd_m, (lat0 + lat1) / 2.0)
    if request.bounds is not None:
        left, bottom, right, top = transform_bounds(request.crs, dst_crs, *request.bounds, densify_pts=21)
        width = max(math.ceil(round((right - left) / size, 6)), 1)
        height = max(math.ceil(round((top - bottom) / size, 6)), 1)
        return Affine(size, 0.0, left, 0.0, -size, top), width, height
    xs, ys = warp_transform(request.crs, dst_crs, [request.center[0]], [request.center[1]])
    width, height = request.size_px
    return Affine(size, 0.0, xs[0] - width / 2 * size, 0.0, -size, ys[0] + height / 2 * size), width, height


def _covering_window(dataset: rasterio.io.DatasetReader, dst_crs: CRS, transform: Affine, width: int,
                     height: int, pad_px: int = 2) -> Window:
    """Source window (dataset grid) covering a target grid, padded by ``pad_px`` for resampling kernels."""
    left, top = transform @ (0, 0)
    right, bottom = transform @ (width, height)
    bounds = transform_bounds(dst_crs, dataset.crs, left, min(bottom, top), right, max(bottom, top),
                              densify_pts=21)
    window = _snap_outward(from_bounds(*bounds, transform=dataset.transform))
    return Window(window.col_off - pad_px, window.row_off - pad_px, window.width + 2 * pad_px,
                  window.height + 2 * pad_px)


def _read_window(dataset: rasterio.io.DatasetReader, window: Window,
                 indexes: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """(pixels (C, H, W), valid (H, W) or None) of an integer window; boundless only when it leaves the raster."""
    inside = (window.col_off >= 0 and window.row_off >= 0 and window.col_off + window.width <= dataset.width
              and window.row_off + window.height <= dataset.height)
    fill = dataset.nodata if dataset.nodata is not None and not np.isnan(dataset.nodata) else 0
    pixels = dataset.read(indexes, window=window, boundless=not inside, fill_value=fill)
    masks = dataset.read_masks(indexes, window=window, boundless=not inside)
    valid = np.asarray(masks).astype(bool).any(axis=0)
    return pixels, (None if valid.all() else valid)


def _open_raster(href: str) -> rasterio.io.DatasetReader:
    """Open ``href`` with rasterio; a clear error naming it when that fails or it has no CRS."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # reported below as a clear error
            dataset = rasterio.open(href)
    except RasterioIOError as exc:
        raise ValueError(f"{href}: cannot open as a raster ({exc})") from exc
    if dataset.crs is None:
        dataset.close()
        raise ValueError(f"{href}: raster has no CRS; use named_tile_chip for name-georeferenced tiles")
    return dataset


def raster_chip(
    href: str, request: RasterWindow, band_selection: Sequence[int | str] | None, target_crs: str | None,
    target_gsd_m: float | None, resampling_method: str, band_names: Sequence[str] | None = None,
    sensor: str = "unknown", acquired_at: str | None = None, extras: dict | None = None,
) -> Chip:
    """One window of ``href`` as a Chip, on the native grid or warped to ``target_crs`` / ``target_gsd_m``."""
    with _open_raster(href) as dataset:
        names = list(band_names) if band_names and len(band_names) == dataset.count else dataset_band_names(dataset)
        indexes = _band_indexes(href, names, band_selection)
        reproject = target_crs is not None or target_gsd_m is not None
        if reproject:
            dst_crs = CRS.from_user_input(target_crs) if target_crs is not None else dataset.crs
            gsd = target_gsd_m or geo.ground_gsd_m(dataset.transform, dataset.crs, dataset.width, dataset.height)
            dst_transform, width, height = _target_grid(request, dst_crs, gsd)
            window = _covering_window(dataset, dst_crs, dst_transform, width, height)
        else:
            window = _native_window(dataset, request)
        pixels, valid = _read_window(dataset, window, indexes)
        transform = dataset.window_transform(window)
        acquired_at = acquired_at or dataset.tags().get("TIFFTAG_DATETIME")
        chip = Chip(
            pixels=pixels, crs=dataset.crs, transform=transform,
            gsd_m=geo.ground_gsd_m(transform, dataset.crs, int(window.width), int(window.height)),
            bands=tuple(names[i - 1] for i in indexes), source=href, valid=valid, sensor=sensor,
            acquired_at=acquired_at, georeferenced=True,
            extras={**(extras or {}), "band_indexes": tuple(indexes),
                    "window": (int(window.col_off), int(window.row_off), int(window.width), int(window.height))},
        )
    if reproject:
        return geo.warp_chip_to_grid(chip, dst_crs, dst_transform, width, height, resampling_method)
    return chip


def geotiff_chip(
    raster_path: str,
    raster_window: RasterWindow,
    band_selection: Sequence[int | str] | None = None,
    target_crs: str | None = None,
    target_gsd_m: float | None = None,
    resampling_method: str = "bilinear",
    raster_sensor: str = "unknown",
) -> Chip:
    """A windowed read of a GeoTIFF/COG (path or URL rasterio opens) as a Chip in the file's dtype.

    ``band_selection``: 1-based indexes or band names, in output order (all bands by default). Without a
    target the chip is on the file's grid (window snapped outward to whole pixels); with ``target_crs`` and/or
    ``target_gsd_m`` (metres) it is warped with ``resampling_method`` (a rasterio Resampling name).
    """
    return raster_chip(raster_path, raster_window, band_selection, target_crs, target_gsd_m, resampling_method,
                        sensor=raster_sensor)


def _tile_pixels(path: Path) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]:
    """Pixels (C, H, W) uint8 of a PNG/BMP/JPEG tile: grey stays one band, palette/RGB(A) become RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("L", "1"):
                return np.asarray(image.convert("L"))[None], None, ("gray",)
            rgba = np.asarray(image.convert("RGBA"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read as an image ({exc})") from exc
    alpha = rgba[..., 3] > 0
    return np.moveaxis(rgba[..., :3], -1, 0).copy(), (None if alpha.all() else alpha), ("red", "green", "blue")


def _file_grid(path: Path) -> tuple[tuple[CRS, Affine] | None, np.ndarray | None]:
    """(the CRS and transform stored with the file (GeoTIFF tags, world file, .aux.xml) or None, (H, W) bool of the
    pixels the file marks valid (GDAL nodata value / mask band) or None when it marks none invalid)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(path) as dataset:
                grid = (dataset.crs, dataset.transform) if dataset.crs is not None else None
                flags = dataset.mask_flag_enums
                if all(MaskFlags.all_valid in band for band in flags) or MaskFlags.alpha in flags[0]:
                    return grid, None  # alpha: already read with the pixels
                return grid, dataset.read_masks().any(axis=0)
        except RasterioError:
            return None, None


def named_tile_chip(tile_path: str, allow_unnamed_tiles: bool = False) -> Chip:
    """A whole PNG/BMP tile as a Chip (uint8; RGB or one grey band) on its file or file-name grid.

    Grid, in order: the georeference stored with the file (``georeferenced=True``); the Jiang PV01 or
    Google-static name convention (``georeferenced=False``, ``extras`` give the convention and the position
    uncertainty in metres); a bare pixel grid if ``allow_unnamed_tiles``, else a ValueError naming the file.
    """
    path = Path(tile_path)
    if not path.is_file():
        raise FileNotFoundError(f"{tile_path}: no such tile file")
    pixels, valid, bands = _tile_pixels(path)
    height, width = pixels.shape[1:]
    stored, file_valid = _file_grid(path)
    if file_valid is not None and file_valid.shape == (height, width):
        valid = file_valid if valid is None else valid & file_valid
    if stored is not None:
        crs, transform = stored
        return Chip(pixels, crs, transform, geo.ground_gsd_m(transform, crs, width, height), bands, str(path),
                    valid, georeferenced=True, extras={"grid_convention": "file"})
    try:
        tile = geo.parse_tile_name(path)
    except ValueError as exc:
        if not allow_unnamed_tiles:
            raise ValueError(f"{exc}; the file has no georeference either "
                             "(set allow_unnamed_tiles=True for a bare pixel grid)") from exc
        return Chip(pixels, geo.PIXEL_GRID_CRS, Affine.identity(), math.nan, bands, str(path), valid,
                    georeferenced=False, extras={"grid_convention": "pixel"})
    grid = geo.named_tile_grid(tile, width, height)
    return Chip(pixels, grid.crs, grid.transform, grid.gsd_m, bands, str(path), valid,
                sensor=TILE_SENSORS[tile.convention], georeferenced=False,
                extras={"grid_convention": grid.convention, "position_uncertainty_m": grid.position_uncertainty_m,
                        "center_lonlat": (tile.lon, tile.lat)})
