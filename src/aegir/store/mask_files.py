"""Mask Factory file I/O: prompt files in, images in, masks (PNG / GeoTIFF) and mask polygons out.

Prompt files:
* CSV with at least ``filename,xmin,ymin,xmax,ymax`` (pixel coordinates; the NREL ``annotations.csv`` layout;
  other columns ignored; several rows per image). Optional ``x,y`` columns with empty box columns are points.
* GeoJSON / GeoParquet / GeoPackage of georeferenced prompts (any CRS, reprojected to EPSG:4326): polygons are box
  prompts (their extent on the image grid), points are point prompts. An optional ``filename`` column pins a
  prompt to one image; otherwise it is used on every image it touches.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from aegir.utils.types import Chip

BOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")
GEO_SUFFIXES = (".geojson", ".json", ".parquet", ".geoparquet", ".gpkg")


class MaskFileError(ValueError):
    """A prompt file, image or mask cannot be read or written as asked (the message names the file)."""


def read_prompt_file(path: str | Path) -> pd.DataFrame:
    """Prompts as a frame: pixel prompts (``filename``, ``xmin..ymax`` / ``x,y``) or georeferenced ones
    (``geometry`` shapely objects in EPSG:4326, optional ``filename``); ``prompt_id`` on every row."""
    path = Path(path)
    if not path.is_file():
        raise MaskFileError(f"{path}: prompt file not found")
    if path.suffix.lower() == ".csv":
        frame = _read_csv_prompts(path)
    elif path.suffix.lower() in GEO_SUFFIXES:
        frame = _read_geo_prompts(path)
    else:
        raise MaskFileError(f"{path}: prompt file must be .csv (pixel boxes) or GeoJSON/GeoParquet/GeoPackage")
    if frame.empty:
        raise MaskFileError(f"{path}: the prompt file holds no prompts")
    return frame.reset_index(drop=True)


def _csv_frame(path: Path, what: str = "prompt file") -> pd.DataFrame:
    """A CSV as a frame with stripped, lower-cased column names (MaskFileError naming the file otherwise)."""
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise MaskFileError(f"{path}: the {what} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise MaskFileError(f"{path}: cannot read as CSV ({exc})") from exc
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    return frame


def _read_csv_prompts(path: Path) -> pd.DataFrame:
    frame = _csv_frame(path)
    has_points = {"x", "y"} <= set(frame.columns)
    missing = [c for c in ("filename", *BOX_COLUMNS) if c not in frame.columns]
    if missing and not ("filename" in frame.columns and has_points):
        raise MaskFileError(f"{path}: prompt CSV lacks column(s) {missing}; need filename,xmin,ymin,xmax,ymax "
                            "(pixel coordinates)")
    out = pd.DataFrame({"filename": frame["filename"].astype(str).str.strip()})
    for column in (*BOX_COLUMNS, "x", "y"):
        out[column] = pd.to_numeric(frame[column], errors="coerce") if column in frame.columns else np.nan
    # a row is a point only when it has no box value at all (a box with a blank / non-numeric corner stays a box
    # and is reported as such); rows of a box-only CSV are boxes
    no_box = frame.reindex(columns=list(BOX_COLUMNS)).isna().all(axis=1).to_numpy()
    out["kind"] = np.where(has_points & no_box, "point", "box")
    out["prompt_id"] = [f"{Path(f).stem}#{i}" for i, f in enumerate(out["filename"])]
    out["source_row"] = np.arange(len(out)) + 2  # 1-based, after the header
    return out


def read_box_annotations(path: str | Path) -> dict[str, np.ndarray]:
    """Box annotations of a CSV with ``filename,xmin,ymin,xmax,ymax`` (pixels; other columns ignored; several rows
    per image) as image stem → (N, 4) float64 ``xmin, ymin, xmax, ymax``. MaskFileError (a ValueError) naming
    the file when it is missing, unreadable, lacks a column or holds a non-numeric corner."""
    path = Path(path)
    if not path.is_file():
        raise MaskFileError(f"{path}: box annotation file not found")
    frame = _csv_frame(path, "box annotation file")
    missing = [c for c in ("filename", *BOX_COLUMNS) if c not in frame.columns]
    if missing:
        raise MaskFileError(f"{path}: box annotations lack column(s) {missing}; need filename,xmin,ymin,xmax,ymax "
                            "(pixel coordinates)")
    corners = frame[list(BOX_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(corners).all(axis=1))
    if bad.size:
        raise MaskFileError(f"{path}: non-numeric box corner(s) on row(s) {(bad + 2).tolist()[:10]} "
                            "(1-based, after the header)")
    stems = np.array([Path(str(f).strip()).stem for f in frame["filename"]])
    return {stem: corners[stems == stem] for stem in dict.fromkeys(stems)}


def read_vector_file(path: Path, what: str = "georeferenced prompts"):
    """A GeoParquet (``.parquet`` / ``.geoparquet``) or any OGR vector file as a GeoDataFrame; MaskFileError
    (a ValueError) naming the file and ``what`` it should hold when it cannot be read."""
    import geopandas as gpd

    try:
        return gpd.read_parquet(path) if path.suffix.lower() in (".parquet", ".geoparquet") else gpd.read_file(path)
    except Exception as exc:  # pyogrio / pyarrow raise several types
        raise MaskFileError(f"{path}: cannot read {what} ({exc})") from exc


def _read_geo_prompts(path: Path) -> pd.DataFrame:
    frame = read_vector_file(path)
    if frame.empty:
        return pd.DataFrame()
    if frame.crs is None:
        raise MaskFileError(f"{path}: georeferenced prompts have no CRS")
    frame = frame.to_crs(4326)
    ids = frame["uuid"].astype(str) if "uuid" in frame.columns else pd.Series([f"{path.stem}#{i}" for i in
                                                                              range(len(frame))])
    return pd.DataFrame({
        "filename": frame["filename"].astype(str) if "filename" in frame.columns else None,
        "geometry": list(frame.geometry.values),
        "prompt_id": ids.to_numpy(),
        "source_row": np.arange(len(frame)),
    })


def read_image_chip(path: str | Path) -> Chip:
    """An image file as a Chip: GeoTIFF via rasterio (its grid), PNG/BMP/JPEG via the named-tile loader (file
    georeference, else the Jiang / Google-static name convention, else a bare pixel grid)."""
    from aegir.store.rasters import named_tile_chip

    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        return _geotiff_chip(path)
    try:
        return named_tile_chip(str(path), allow_unnamed_tiles=True)
    except (OSError, ValueError) as exc:
        raise MaskFileError(f"{path}: cannot read the image ({exc})") from exc


def _geotiff_chip(path: Path) -> Chip:
    import rasterio
    from affine import Affine
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    from aegir.utils import geo

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as dataset:
                pixels = dataset.read()
                masks = dataset.read_masks()
                crs, transform = dataset.crs, dataset.transform
    except RasterioIOError as exc:
        raise MaskFileError(f"{path}: cannot read the image ({exc})") from exc
    valid = np.asarray(masks).astype(bool).any(axis=0)
    bands = ("red", "green", "blue")[: pixels.shape[0]] if pixels.shape[0] <= 3 else tuple(
        f"band{i}" for i in range(1, pixels.shape[0] + 1))
    if crs is None:
        return Chip(pixels, geo.PIXEL_GRID_CRS, Affine.identity(), float("nan"), bands, str(path),
                    None if valid.all() else valid, georeferenced=False, extras={"grid_convention": "pixel"})
    gsd = geo.ground_gsd_m(transform, crs, pixels.shape[2], pixels.shape[1])
    return Chip(pixels, crs, transform, gsd, bands, str(path), None if valid.all() else valid, georeferenced=True,
                extras={"grid_convention": "file"})


def write_mask_png(mask: np.ndarray, path: str | Path) -> Path:
    """(H, W) mask → single-band uint8 PNG, 0 background / 255 PV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), mode="L").save(path)
    return path


def write_mask_geotiff(mask: np.ndarray, chip: Chip, path: str | Path) -> Path:
    """(H, W) mask → single-band uint8 GeoTIFF (0/255) on the chip's grid and CRS (deflate)."""
    import rasterio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=mask.shape[1], height=mask.shape[0], count=1,
                       dtype="uint8", crs=chip.crs, transform=chip.transform, compress="deflate") as dst:
        dst.write(np.where(mask > 0, 255, 0).astype(np.uint8), 1)
    return path


def write_polygons(frame, path: str | Path) -> Path:
    """A GeoDataFrame (EPSG:4326) → GeoParquet (``.parquet``), GeoPackage (``.gpkg``, layer = file stem, replaced)
    or GeoJSON (anything else)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".parquet", ".geoparquet"):
        frame.to_parquet(path)
    elif path.suffix.lower() == ".gpkg":
        path.unlink(missing_ok=True)
        frame.to_file(path, driver="GPKG", layer=path.stem)
    else:
        path.write_text(frame.to_json(drop_id=True) if len(frame) else json.dumps(
            {"type": "FeatureCollection", "features": []}))
    return path


def write_component_box_prompts(images_dir: str | Path, masks_dir: str | Path, path: str | Path) -> int:
    """A prompt CSV (``filename,xmin,ymin,xmax,ymax``) with one box per connected component of each image's mask
    (matched by file stem); returns the number of prompts written."""
    import csv

    from aegir.utils.components import mask_component_boxes
    from aegir.store.image_files import list_image_files, mask_files_by_stem, read_mask

    by_stem = mask_files_by_stem(masks_dir)
    rows = 0
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", *BOX_COLUMNS])
        for image in list_image_files(images_dir):
            if image.stem in by_stem:
                for box in mask_component_boxes(read_mask(by_stem[image.stem])):
                    writer.writerow([image.name, *box])
                    rows += 1
    return rows
