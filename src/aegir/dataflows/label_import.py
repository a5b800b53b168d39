"""Hamilton dataflow: one label file's rows → the lakehouse's ``raw_<dataset>`` rows + quarantine rows.

Nodes (each named for what it returns): geometries are reprojected from the file's CRS to EPSG:4326 (lon/lat,
``always_xy``), repaired with ``make_valid`` (polygon inputs keep only their polygonal parts), measured on the
WGS84 ellipsoid (``area_m2``, geodesic), and indexed (S2 tokens via :mod:`aegir.dataflows.s2_indexing`, H3).
Rows with no usable geometry go to quarantine with the reason; ``row_hash`` makes re-imports idempotent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import shapely

from aegir.store.label_files import LabelSource
from aegir.utils import geo

DERIVED_COLUMNS = (
    "row_hash", "dataset_name", "source_file", "source_row", "geometry_wkt", "geometry_wkb", "area_m2",
    "centroid_lat", "centroid_lon", "h3_12", "label_date", "doi", "imported_at",
)
DATE_COLUMN_CANDIDATES = ("label_date", "date", "p_img_date", "image_date", "acquired", "acquisition_date")
_POLYGONAL = {"Polygon", "MultiPolygon"}


def _reserved(name: str) -> bool:
    return name.lower() in DERIVED_COLUMNS or name.lower().startswith("s2_token_l") or name.lower() == "geometry"


def source_attributes(label_source: LabelSource) -> pd.DataFrame:
    """The file's own columns (no geometry), renamed ``src_<name>`` where they clash with derived columns."""
    frame = pd.DataFrame(label_source.frame.drop(columns=[label_source.frame.geometry.name, "source_row"]))
    renamed, seen = {}, set()
    for column in frame.columns:
        name = f"src_{column}" if _reserved(str(column)) else str(column)
        while name.lower() in seen:
            name = f"{name}_dup"
        seen.add(name.lower())
        renamed[column] = name
    return frame.rename(columns=renamed)


def geometry_4326(label_source: LabelSource) -> np.ndarray:
    """Geometries reprojected to EPSG:4326 (x = lon, y = lat), 2-D (a Z coordinate is dropped); None where the
    source had none. Shape (N,)."""
    series = gpd.GeoSeries(label_source.frame.geometry.values, crs=label_source.crs)
    if not label_source.crs.equals("EPSG:4326", ignore_axis_order=True):
        series = series.to_crs("EPSG:4326")
    return shapely.force_2d(np.asarray(series.values, dtype=object))  # Z / M values are dropped


def _polygonal_part(geometry: shapely.Geometry) -> shapely.Geometry:
    """The polygons of a make_valid result (drops stray lines/points); empty when none."""
    if geometry.geom_type in _POLYGONAL:
        return geometry
    polygons = [g for g in shapely.get_parts(geometry) if g.geom_type in _POLYGONAL]
    return shapely.union_all(polygons) if polygons else shapely.Polygon()


def repaired_geometry(geometry_4326: np.ndarray) -> np.ndarray:
    """Valid geometries: invalid ones through ``make_valid``, keeping the input's dimension. Shape (N,)."""
    out = geometry_4326.copy()
    present = ~shapely.is_missing(out)
    invalid = np.flatnonzero(present & ~shapely.is_valid(np.where(present, out, None)))
    for index in invalid:
        original = out[index]
        fixed = shapely.make_valid(original)
        out[index] = _polygonal_part(fixed) if original.geom_type in _POLYGONAL else fixed
    return out


def _widest_part_lon_span(geometry: shapely.Geometry) -> float:
    """The largest longitude extent of one part (polygon / line / point) of a geometry, in degrees.

    A part wider than 180° is drawn the long way round the globe: in lon/lat it crosses the antimeridian without
    being split there (a split MultiPolygon's parts each stay narrow)."""
    bounds = shapely.bounds(shapely.get_parts(geometry))
    return float((bounds[:, 2] - bounds[:, 0]).max()) if len(bounds) else 0.0


def geometry_problems(label_source: LabelSource, geometry_4326: np.ndarray, repaired_geometry: np.ndarray) -> dict[int, str]:
    """source_row → reason, for rows that cannot be imported (reading problems, no/empty/unfixable geometry)."""
    problems = dict(label_source.row_problems)
    rows = label_source.frame["source_row"].to_numpy()
    for position, geometry in enumerate(repaired_geometry):
        row = int(rows[position])
        if row in problems:
            continue
        if geometry is None:
            problems[row] = "geometry is missing (null)"
        elif geometry_4326[position].is_empty:
            problems[row] = "geometry is empty"
        elif geometry.is_empty:
            problems[row] = f"invalid {geometry_4326[position].geom_type} could not be repaired (make_valid left nothing)"
        else:
            min_lon, min_lat, max_lon, max_lat = geometry.bounds
            span = _widest_part_lon_span(geometry)
            if not (-180 <= min_lon <= max_lon <= 180 and -90 <= min_lat <= max_lat <= 90):
                problems[row] = f"coordinates outside lon/lat range after reprojection: bounds {geometry.bounds}"
            elif span > 180:
                problems[row] = (f"crosses the antimeridian (one part spans {span:.3f}° of longitude); split it at "
                                 "±180° into a MultiPolygon")
    return problems


def accepted_mask(label_source: LabelSource, geometry_problems: dict[int, str]) -> np.ndarray:
    """True for rows that land in ``raw_<dataset>``. Shape (N,), bool."""
    rows = label_source.frame["source_row"].to_numpy()
    return ~np.isin(rows, np.fromiter(geometry_problems, dtype=np.int64, count=len(geometry_problems)))


def accepted_geometry(repaired_geometry: np.ndarray, accepted_mask: np.ndarray) -> np.ndarray:
    """Valid EPSG:4326 geometries of the accepted rows. Shape (M,)."""
    return repaired_geometry[accepted_mask]


def area_m2(accepted_geometry: np.ndarray) -> np.ndarray:
    """Geodesic area on the WGS84 ellipsoid in m² (0 for points/lines). Shape (M,), float64."""
    return geo.geodesic_area_m2(accepted_geometry)


def _centroids(accepted_geometry: np.ndarray) -> np.ndarray:
    return shapely.centroid(accepted_geometry)


def centroid_lon(accepted_geometry: np.ndarray) -> np.ndarray:
    """Centroid longitude in degrees (EPSG:4326, planar centroid of the lon/lat geometry). Shape (M,)."""
    return shapely.get_x(_centroids(accepted_geometry))


def centroid_lat(accepted_geometry: np.ndarray) -> np.ndarray:
    """Centroid latitude in degrees (EPSG:4326). Shape (M,)."""
    return shapely.get_y(_centroids(accepted_geometry))


def _row_digests(label_source: LabelSource, dataset_name: str) -> np.ndarray:
    """sha256 over dataset + source attributes + source geometry WKB; repeats in one file get an occurrence suffix."""
    attributes = label_source.frame.drop(columns=[label_source.frame.geometry.name, "source_row"])
    records = attributes.astype(object).where(attributes.notna(), None).to_numpy().tolist()
    wkbs = shapely.to_wkb(label_source.frame.geometry.values, hex=True)
    seen: Counter[str] = Counter()
    digests = []
    for record, wkb in zip(records, wkbs):
        payload = json.dumps([dataset_name, record, wkb], default=str, separators=(",", ":"))
        digest = hashlib.sha256(payload.encode()).hexdigest()[:32]
        seen[digest] += 1
        digests.append(digest if seen[digest] == 1 else f"{digest}-{seen[digest] - 1}")
    return np.array(digests, dtype=object)


def row_hash(label_source: LabelSource, dataset_name: str) -> np.ndarray:
    """Content hash of every source row (32 hex chars, ``-k`` for the k-th repeat of an identical row). Shape (N,)."""
    return _row_digests(label_source, dataset_name)


def label_date(label_source: LabelSource) -> np.ndarray:
    """Per-row date (datetime64[D]) from the first date-like column (e.g. USPVDB ``p_img_date`` YYYYMMDD), else NaT."""
    columns = {str(c).lower(): c for c in label_source.frame.columns}
    for candidate in DATE_COLUMN_CANDIDATES:
        if candidate in columns:
            values = label_source.frame[columns[candidate]]
            text = values.astype("string").str.replace(r"\.0$", "", regex=True)
            compact = text.str.fullmatch(r"\d{8}").fillna(False).to_numpy(dtype=bool)
            parsed = pd.to_datetime(text.where(~compact), errors="coerce", utc=False, format="mixed")
            parsed_compact = pd.to_datetime(text.where(compact), errors="coerce", format="%Y%m%d")
            merged = parsed_compact.where(compact, parsed)
            return merged.to_numpy(dtype="datetime64[D]")
    return np.full(len(label_source.frame), np.datetime64("NaT"), dtype="datetime64[D]")


def _arrow_attributes(attributes: pd.DataFrame) -> pa.Table:
    """Source columns as Arrow; columns of mixed Python types become strings."""
    arrays, names = [], []
    for column in attributes.columns:
        series = attributes[column]
        try:
            array = pa.array(series, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            array = pa.array(series.astype("string"), from_pandas=True)
        if pa.types.is_null(array.type):
            array = array.cast(pa.string())
        arrays.append(array)
        names.append(str(column))
    return pa.Table.from_arrays(arrays, names=names)


def label_rows(
    label_source: LabelSource,
    dataset_name: str,
    source_attributes: pd.DataFrame,
    accepted_mask: np.ndarray,
    accepted_geometry: np.ndarray,
    row_hash: np.ndarray,
    area_m2: np.ndarray,
    centroid_lat: np.ndarray,
    centroid_lon: np.ndarray,
    s2_tokens_by_level: dict[int, np.ndarray],
    h3_cell_ids: np.ndarray,
    h3_resolution: int,
    label_date: np.ndarray,
    imported_at: dt.datetime,
    doi: str | None = None,
) -> pa.Table:
    """The ``raw_<dataset>`` rows: source columns kept + the derived schema columns (``s2_token_l<level>`` per
    ``store.ducklake.LABEL_S2_LEVELS``, ``h3_<resolution>``). One row per accepted row."""
    count = int(accepted_mask.sum())
    attributes = _arrow_attributes(source_attributes[accepted_mask].reset_index(drop=True))
    derived = {
        "row_hash": pa.array(row_hash[accepted_mask], pa.string()),
        "dataset_name": pa.array([dataset_name] * count, pa.string()),
        "source_file": pa.array([str(label_source.path)] * count, pa.string()),
        "source_row": pa.array(label_source.frame["source_row"].to_numpy()[accepted_mask], pa.int64()),
        "geometry_wkt": pa.array(shapely.to_wkt(accepted_geometry, rounding_precision=-1), pa.string()),
        "geometry_wkb": pa.array(shapely.to_wkb(accepted_geometry), pa.binary()),
        "area_m2": pa.array(area_m2, pa.float64()),
        "centroid_lat": pa.array(centroid_lat, pa.float64()),
        "centroid_lon": pa.array(centroid_lon, pa.float64()),
    }
    for level, tokens in sorted(s2_tokens_by_level.items()):
        derived[f"s2_token_l{level}"] = pa.array(tokens, pa.string())
    derived[f"h3_{h3_resolution}"] = pa.array(h3_cell_ids, pa.string())
    derived["label_date"] = pa.array(label_date[accepted_mask], pa.date32())
    derived["doi"] = pa.array([doi] * count, pa.string())
    derived["imported_at"] = pa.array([imported_at] * count, pa.timestamp("us", tz="UTC"))
    table = pa.table(derived)  # built from the derived columns: a file without properties has no source column
    for position, name in enumerate(attributes.column_names):
        table = table.add_column(position, name, attributes.column(position))
    return table


def quarantine_rows(
    label_source: LabelSource,
    dataset_name: str,
    geometry_problems: dict[int, str],
    row_hash: np.ndarray,
    imported_at: dt.datetime,
) -> pa.Table:
    """One row per rejected source row: dataset, file, row number, reason, the raw record as JSON."""
    frame = label_source.frame
    positions = np.flatnonzero(np.isin(frame["source_row"].to_numpy(), list(geometry_problems)))
    attributes = frame.drop(columns=[frame.geometry.name]).iloc[positions]
    geometries = frame.geometry.values[positions]
    records = attributes.astype(object).where(attributes.notna(), None).to_dict("records")
    return pa.table(
        {
            "row_hash": pa.array(row_hash[positions], pa.string()),
            "dataset_name": pa.array([dataset_name] * len(positions), pa.string()),
            "source_file": pa.array([str(label_source.path)] * len(positions), pa.string()),
            "source_row": pa.array(frame["source_row"].to_numpy()[positions], pa.int64()),
            "reason": pa.array([geometry_problems[int(r)] for r in frame["source_row"].to_numpy()[positions]], pa.string()),
            "raw_record": pa.array([json.dumps(r, default=str) for r in records], pa.string()),
            "geometry_wkt": pa.array(
                [None if g is None else shapely.to_wkt(g) for g in geometries], pa.string()
            ),
            "quarantined_at": pa.array([imported_at] * len(positions), pa.timestamp("us", tz="UTC")),
        }
    )
