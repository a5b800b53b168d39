"""Imagery files for the catalog: headers (grid, bands, time, sensor) without decoding pixels, content hashes, and
the checked read of a catalogued image.

Sources: GeoTIFF/COG and other rasters GDAL opens (their own grid), PNG/BMP/JPEG tiles (a world file / stored
georeference, else the Jiang PV01 or Google-static name convention, else — only when asked — a bare pixel grid),
folders of those, STAC static catalogs (one image per item: its data asset), Sentinel-2 band folders (one
product; its processing baseline from the product metadata via :func:`aegir.store.msi_files.msi_radiometry`) and
Satellogic EarthView Parquet shards (one image per row and revisit, uri ``<shard>#row=<i>&revisit=<r>``).
A file that cannot be used raises :class:`ImageryError` naming it and the problem; registration quarantines it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import rasterio.windows
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from aegir.store import rasters
from aegir.utils import geo
from aegir.utils.types import Chip

RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".bmp", ".jpg", ".jpeg", ".jp2", ".vrt", ".img")
_HASH_CHUNK = 8 << 20


class ImageryError(ValueError):
    """An image that cannot be catalogued or read as catalogued; the message names the file and the problem."""


@dataclass(frozen=True)
class ImageHeader:
    """What the catalog stores about one image. ``crs``/``transform`` map pixel corners (col, row) to the grid;
    ``crs`` is None for a bare pixel grid. ``grid_convention``: ``file`` (stored georeference),
    ``jiang_pv01_name_centre_utm`` /
    ``google_static_z19_name_centre_webmercator`` (from the file name), ``pixel`` (none), ``sentinel-2`` (band folder), ``stac``,
    ``earthview`` (a shard row's metadata footprint)."""

    uri: str
    image_id: str
    size_bytes: int
    crs: CRS | None
    transform: Affine
    width: int
    height: int
    bands: tuple[str, ...]
    dtype: str
    grid_convention: str
    sensor: str = "unknown"
    acquired_at: dt.datetime | None = None
    position_uncertainty_m: float | None = None
    product_level: str | None = None
    processing_baseline: str | None = None
    truth_uri: str | None = None
    extras: dict = field(default_factory=dict)

    @property
    def georeferenced(self) -> bool:
        """True when the grid is read from the file (or product), not a name convention or a bare pixel grid."""
        return self.grid_convention in ("file", "sentinel-2", "stac", "earthview")


def content_hash(path: str | Path) -> str:
    """First 32 hex digits of the SHA-256 of a local file's bytes: the catalog's ``image_id``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def _uri_hash(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:32]


def _band_names(dataset: rasterio.io.DatasetReader) -> tuple[str, ...]:
    return tuple(rasters.dataset_band_names(dataset))


def _tiff_time(tags: dict) -> dt.datetime | None:
    text = tags.get("TIFFTAG_DATETIME")
    if not text:
        return None
    try:
        return dt.datetime.strptime(text, "%Y:%m:%d %H:%M:%S").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def raster_header(path: str, allow_pixel_grid: bool = False, image_id: str | None = None,
                  sensor: str | None = None, acquired_at: dt.datetime | None = None) -> ImageHeader:
    """The header of one raster file or URL; a non-georeferenced tile uses its name convention when it has one,
    a bare pixel grid only with ``allow_pixel_grid``, else :class:`ImageryError`."""
    local = "://" not in path
    if local:
        file = Path(path)
        if not file.is_file():
            raise ImageryError(f"{path}: no such file")
        if file.stat().st_size == 0:
            raise ImageryError(f"{path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as dataset:
                crs, transform = dataset.crs, dataset.transform
                width, height, bands = dataset.width, dataset.height, _band_names(dataset)
                dtype, tags = dataset.dtypes[0], dataset.tags()
                # the block holding the last pixel: a truncated file fails here, at the cost of one block read
                dataset.read(1, window=rasterio.windows.Window(width - 1, height - 1, 1, 1))
    except (RasterioIOError, OSError, rasterio.errors.RasterioError) as exc:
        raise ImageryError(f"{path}: cannot read as a raster ({str(exc).splitlines()[0]})") from exc
    image_id = image_id or (content_hash(path) if local else _uri_hash(path))
    size = Path(path).stat().st_size if local else 0
    common = dict(uri=path if not local else str(Path(path).resolve()), image_id=image_id, size_bytes=size,
                  width=width, height=height, bands=bands, dtype=dtype,
                  acquired_at=acquired_at or _tiff_time(tags))
    if crs is not None:
        return ImageHeader(crs=crs, transform=transform, grid_convention="file", sensor=sensor or "unknown", **common)
    try:
        tile = geo.parse_tile_name(path)
    except ValueError as exc:
        if not allow_pixel_grid:
            raise ImageryError(f"{path}: no georeference (no CRS, world file or known tile-name convention); "
                               "register it with --allow-pixel-grid to keep it on a bare pixel grid") from exc
        return ImageHeader(crs=None, transform=Affine.identity(), grid_convention="pixel",
                           sensor=sensor or "unknown", **common)
    grid = geo.named_tile_grid(tile, width, height)
    return ImageHeader(crs=grid.crs, transform=grid.transform, grid_convention=grid.convention,
                       sensor=sensor or rasters.TILE_SENSORS.get(tile.convention, "unknown"),
                       position_uncertainty_m=grid.position_uncertainty_m, **common)


def is_sentinel2_folder(folder: Path) -> bool:
    """True when ``folder`` holds Sentinel-2 band files (``*B02*`` and ``*B04*`` rasters)."""
    names = [p.name.upper() for p in folder.iterdir() if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES]
    return any("B02" in n for n in names) and any("B04" in n for n in names)


def sentinel2_header(folder: str, processing_baseline: str | None = None) -> ImageHeader:
    """One Sentinel-2 product (a folder of band files): grid of its 10 m bands, level and processing baseline from
    the product metadata (or ``processing_baseline``); :class:`ImageryError` when the baseline cannot be known."""
    from aegir.store import msi_files

    try:
        files = msi_files.msi_band_files(folder)
        grid = msi_files.msi_scene_grid(files)
        radiometry = msi_files.msi_radiometry(folder, processing_baseline)
    except msi_files.MsiError as exc:
        raise ImageryError(str(exc)) from exc
    digest = hashlib.sha256()
    for band in sorted(files):
        digest.update(content_hash(files[band]).encode())
    return ImageHeader(
        uri=str(Path(folder).resolve()), image_id=digest.hexdigest()[:32],
        size_bytes=sum(Path(p).stat().st_size for p in files.values()), crs=grid.crs, transform=grid.transform,
        width=grid.width, height=grid.height, bands=tuple(sorted(files)), dtype="uint16",
        grid_convention="sentinel-2", sensor="sentinel-2", product_level=radiometry.product_level,
        processing_baseline=radiometry.processing_baseline,
        extras={"dn_offset": radiometry.dn_offset, "baseline_source": radiometry.source})


def stac_headers(catalog_path: str) -> Iterator[ImageHeader | ImageryError]:
    """One header per item of a STAC static catalog (its data/GeoTIFF asset), or the error for that item."""
    from aegir.store import stac

    try:
        items = stac.stac_items(stac.stac_catalog(catalog_path))
    except Exception as exc:  # pystac raises many types for a malformed catalog
        yield ImageryError(f"{catalog_path}: cannot read as a STAC catalog ({type(exc).__name__}: {exc})")
        return
    for item in items:
        try:
            _, asset = stac._asset_for(item, None)
            href = asset.get_absolute_href() or asset.href
            start, _ = stac._item_interval(item)
            header = raster_header(href, sensor=stac._item_sensor(item), acquired_at=start)
        except (ImageryError, ValueError) as exc:
            yield ImageryError(f"{catalog_path}: item {item.id}: {exc}")
            continue
        baseline = item.properties.get("s2:processing_baseline")
        yield _replace(header, grid_convention="stac" if header.crs is not None else header.grid_convention,
                       processing_baseline=str(baseline) if baseline else None,
                       extras={"stac_item": item.id, "stac_catalog": str(Path(catalog_path).resolve())})


def _replace(header: ImageHeader, **changes) -> ImageHeader:
    import dataclasses

    return dataclasses.replace(header, **changes)


def image_headers(path: str, allow_pixel_grid: bool = False, truth_by_stem: dict[str, Path] | None = None,
                  processing_baseline: str | None = None) -> Iterator[ImageHeader | ImageryError]:
    """Headers of everything under ``path`` (a raster, a folder — recursively —, a STAC catalog JSON, a
    Sentinel-2 band folder or an EarthView ``.parquet`` shard; in a folder, only Parquet files with EarthView's
    columns), each image or the :class:`ImageryError` that keeps it out. ``truth_by_stem``: pixel ground-truth
    masks matched to images by file stem."""
    from aegir.store.imagery_earthview import earthview_headers, is_earthview_shard

    target = Path(path)
    truth_by_stem = truth_by_stem or {}
    if "://" not in path and not target.exists():
        yield ImageryError(f"{path}: no such file or folder")
        return
    if target.suffix.lower() == ".json":
        yield from stac_headers(path)
        return
    if target.suffix.lower() == ".parquet" and target.is_file():
        yield from earthview_headers(path)
        return
    if target.is_dir():
        if is_sentinel2_folder(target):
            try:
                yield sentinel2_header(path, processing_baseline)
            except ImageryError as exc:
                yield exc
            return
        for child in sorted(target.iterdir()):
            if child.is_dir() or child.suffix.lower() in RASTER_SUFFIXES or (
                    child.suffix.lower() == ".parquet" and is_earthview_shard(child)):
                yield from image_headers(str(child), allow_pixel_grid, truth_by_stem, processing_baseline)
        return
    try:
        header = raster_header(path, allow_pixel_grid)
    except ImageryError as exc:
        yield exc
        return
    truth = truth_by_stem.get(target.stem)
    yield _replace(header, truth_uri=str(truth.resolve())) if truth else header


# ---- reading a catalogued image ------------------------------------------------------------------------------


def read_catalogued_image(uri: str, image_id: str, grid_convention: str) -> Chip:
    """The whole image of a catalog row as a Chip on its catalogued grid, after checking that the file is still
    there and unchanged (its content hash is ``image_id``); :class:`ImageryError` otherwise."""
    from aegir.store import mask_files
    from aegir.store.rasters import named_tile_chip

    if grid_convention == "earthview":
        from aegir.store.imagery_earthview import earthview_chip

        return earthview_chip(uri, image_id)
    local = "://" not in uri
    if local:
        if not Path(uri).is_file():
            raise ImageryError(f"{uri}: catalogued image is gone (the file no longer exists); re-register its folder")
        if content_hash(uri) != image_id:
            raise ImageryError(f"{uri}: the file changed since it was catalogued (content hash differs from "
                               f"{image_id}); re-register it with `aegir imagery register`")
    try:
        if "_name_centre_" in grid_convention:  # a tile georeferenced by its file name
            return named_tile_chip(uri)
        chip = mask_files.read_image_chip(uri) if local else _remote_chip(uri)
    except (OSError, ValueError) as exc:
        raise ImageryError(f"{uri}: cannot read the image ({exc})") from exc
    return chip


def _remote_chip(uri: str) -> Chip:
    with rasterio.open(uri) as dataset:
        pixels = dataset.read()
        gsd = geo.ground_gsd_m(dataset.transform, dataset.crs, dataset.width, dataset.height)
        return Chip(pixels, dataset.crs, dataset.transform, gsd, _band_names(dataset), uri)


def header_gsd_m(header: ImageHeader) -> float:
    """Ground sample distance in metres (NaN on a bare pixel grid)."""
    if header.crs is None:
        return math.nan
    return float(geo.ground_gsd_m(header.transform, header.crs, header.width, header.height))


def truth_for(header_truth_uri: str | None, height: int, width: int) -> np.ndarray | None:
    """(H, W) uint8 0/1 pixel ground truth of a catalogued image, None without one; :class:`ImageryError` when
    the file is unreadable or of another size."""
    if not header_truth_uri:
        return None
    from aegir.store.image_files import read_mask

    try:
        mask = read_mask(header_truth_uri)
    except ValueError as exc:
        raise ImageryError(str(exc)) from exc
    if mask.shape != (height, width):
        raise ImageryError(f"{header_truth_uri}: truth mask is {mask.shape}, its image is {(height, width)}")
    return mask
