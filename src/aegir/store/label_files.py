"""Reading PV label files: GeoJSON, Shapefile, GeoPackage, GeoParquet, and CSV with lon/lat columns.

Returns the rows as they are in the file (source columns untouched) with their geometry in the file's declared
CRS, plus per-row problems found while reading (e.g. a CSV row without coordinates). Whole-file problems
(unreadable, no CRS, no coordinate columns) raise :class:`LabelFileError` naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely
from pyproj import CRS
from pyproj.exceptions import CRSError

from aegir.store.errors import one_line

VECTOR_SUFFIXES = {".geojson", ".json", ".shp", ".gpkg", ".fgb"}
PARQUET_SUFFIXES = {".parquet", ".geoparquet"}
CSV_SUFFIXES = {".csv", ".tsv"}
LON_NAMES = ("lon", "lng", "long", "longitude", "xlong", "x")
LAT_NAMES = ("lat", "latitude", "ylat", "y")


class LabelFileError(ValueError):
    """A label file that cannot be imported at all; the message names the file and the problem."""


@dataclass
class LabelSource:
    """Rows of one label file. ``frame`` keeps source columns + ``geometry`` (in ``crs``) + ``source_row`` (0-based).

    ``row_problems`` maps source_row → reason for rows that must go to quarantine.
    """

    path: Path
    frame: gpd.GeoDataFrame
    crs: CRS
    row_problems: dict[int, str] = field(default_factory=dict)


def _parse_crs(path: Path, crs: str | None) -> CRS | None:
    if crs is None:
        return None
    try:
        return CRS.from_user_input(crs)
    except CRSError as exc:
        raise LabelFileError(f"{path}: cannot understand the CRS {crs!r}: {exc}") from exc


def _read_vector(path: Path) -> gpd.GeoDataFrame:
    if path.suffix.lower() == ".shp":
        missing = [s for s in (".shx", ".dbf") if not path.with_suffix(s).exists()]
        if missing:
            raise LabelFileError(f"{path}: shapefile is incomplete, missing {', '.join(missing)} beside it")
    try:
        return pyogrio.read_dataframe(path, on_invalid="ignore")
    except Exception as exc:  # pyogrio raises DataSourceError, GEOSException, …
        raise LabelFileError(f"{path}: cannot read as a vector file ({type(exc).__name__}: {one_line(exc)})") from exc


_GEOJSON_CRS = re.compile(rb'"crs"\s*:\s*\{[^{}]*"properties"\s*:\s*\{[^{}]*"name"\s*:\s*"([^"]*)"')


def _geojson_declared_crs(path: Path) -> str | None:
    """The name in a GeoJSON's legacy top-level ``crs`` member (read from the file's first 64 KiB), or None.

    GDAL silently reads a GeoJSON whose ``crs`` it does not know as EPSG:4326; the caller checks the name itself.
    """
    with path.open("rb") as handle:
        head = handle.read(65536)
    match = _GEOJSON_CRS.search(head)
    return match.group(1).decode("utf-8", "replace") if match else None


def _read_geoparquet(path: Path) -> gpd.GeoDataFrame:
    try:
        return gpd.read_parquet(path)
    except Exception as exc:
        raise LabelFileError(f"{path}: cannot read as GeoParquet ({type(exc).__name__}: {one_line(exc)})") from exc


def _find_column(columns: list[str], candidates: tuple[str, ...], explicit: str | None, path: Path, what: str) -> str:
    if explicit:
        if explicit not in columns:
            raise LabelFileError(f"{path}: {what} column {explicit!r} not found; columns are {columns}")
        return explicit
    lowered = {c.lower().strip(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise LabelFileError(
        f"{path}: no {what} column found (looked for {', '.join(candidates)}); columns are {columns}. "
        f"Pass --{what[:3]}-col NAME."
    )


def _read_csv_points(path: Path, lon_col: str | None, lat_col: str | None) -> tuple[gpd.GeoDataFrame, dict[int, str]]:
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        frame = pd.read_csv(path, sep=sep, encoding="utf-8-sig", low_memory=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise LabelFileError(f"{path}: cannot read as CSV ({type(exc).__name__}: {one_line(exc)})") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    lon_name = _find_column(list(frame.columns), LON_NAMES, lon_col, path, "longitude")
    lat_name = _find_column(list(frame.columns), LAT_NAMES, lat_col, path, "latitude")
    lon = pd.to_numeric(frame[lon_name], errors="coerce").to_numpy(dtype=float)
    lat = pd.to_numeric(frame[lat_name], errors="coerce").to_numpy(dtype=float)
    bad = ~(np.isfinite(lon) & np.isfinite(lat))
    problems = {
        int(i): f"missing or non-numeric coordinates {lon_name}={frame[lon_name].iloc[i]!r}, "
        f"{lat_name}={frame[lat_name].iloc[i]!r}"
        for i in np.flatnonzero(bad)
    }
    points = shapely.points(np.where(bad, 0.0, lon), np.where(bad, 0.0, lat))
    points[bad] = None
    return gpd.GeoDataFrame(frame, geometry=points, crs="EPSG:4326"), problems


def read_label_file(
    path: str | Path, crs: str | None = None, lon_col: str | None = None, lat_col: str | None = None
) -> LabelSource:
    """Read one label file; ``crs`` overrides/supplies the CRS (required for a shapefile without .prj)."""
    path = Path(path)
    if not path.exists():
        raise LabelFileError(f"{path}: file not found")
    path = path.resolve()
    suffix = path.suffix.lower()
    override = _parse_crs(path, crs)
    if path.is_file() and path.stat().st_size == 0:
        raise LabelFileError(f"{path}: the file is empty (0 bytes)")
    problems: dict[int, str] = {}
    if suffix in CSV_SUFFIXES:
        frame, problems = _read_csv_points(path, lon_col, lat_col)
    elif suffix in PARQUET_SUFFIXES:
        frame = _read_geoparquet(path)
    elif suffix in VECTOR_SUFFIXES:
        frame = _read_vector(path)
    else:
        raise LabelFileError(
            f"{path}: unsupported label format {suffix!r}; use GeoJSON, Shapefile, GeoPackage, GeoParquet or CSV"
        )
    if override is not None:
        frame = frame.set_crs(override, allow_override=True)
    elif suffix in (".geojson", ".json") and (declared := _geojson_declared_crs(path)) is not None:
        try:
            CRS.from_user_input(declared)
        except CRSError:
            raise LabelFileError(f"{path}: the file declares the unknown CRS {declared!r}; "
                                 "pass --crs EPSG:XXXX") from None
    if len(frame) == 0:
        raise LabelFileError(f"{path}: the file holds no label rows (no features)")
    if frame.crs is None:
        hint = " (the .prj beside the .shp is missing)" if suffix == ".shp" else ""
        raise LabelFileError(f"{path}: the file declares no CRS{hint}; pass --crs EPSG:XXXX")
    frame = frame.reset_index(drop=True)
    frame["source_row"] = np.arange(len(frame), dtype=np.int64)
    return LabelSource(path=path, frame=frame, crs=CRS.from_user_input(frame.crs), row_problems=problems)
