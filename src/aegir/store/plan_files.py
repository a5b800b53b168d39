"""Files a national plan reads: the AOI (a file, a bbox, or a country name looked up in a boundary file),
built-up evidence per S2 cell, and a measured inference throughput (chips/s) for the compute estimate.

Country names are looked up in a vector file of country polygons (``aegir plan --boundaries``:
e.g. Natural Earth admin-0, GADM level 0, geoBoundaries ADM0), by name or ISO code, case-insensitive. Without one,
the Natural Earth 1:110m admin-0 countries (public domain) that the installed ``pyogrio`` package ships
(``pyogrio/tests/fixtures/naturalearth_lowres``) are used: offline, but coarse (borders generalised by ~1-5 km), so
border cells of a fine plan can be missing; give a detailed boundary file for production plans.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
import shapely

from aegir.store import mask_files, region_files

NAME_COLUMNS = ("name", "name_en", "admin", "name_long", "country", "name_0", "shapename", "cntry_name")
CODE_COLUMNS = ("iso_a3", "adm0_a3", "iso_a2", "gid_0", "shapegroup", "iso3", "iso")


def bundled_boundaries() -> Path | None:
    """Natural Earth 1:110m admin-0 countries shipped inside the installed ``pyogrio`` (None when absent)."""
    spec = importlib.util.find_spec("pyogrio")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tests/fixtures/naturalearth_lowres/naturalearth_lowres.shp"
    return path if path.is_file() else None


def _looks_like_place_name(aoi: str) -> bool:
    """No such file, no path separator or vector/text suffix, no digits (a bbox) and no WKT parenthesis."""
    suffix = Path(aoi).suffix.lower()
    return not (Path(aoi).exists() or "/" in aoi or suffix in (*region_files.GEO_SUFFIXES, ".wkt", ".txt")
                or any(ch.isdigit() or ch == "(" for ch in aoi))


def read_plan_aoi(aoi: str, boundaries: str | Path | None = None) -> tuple[shapely.Geometry, str]:
    """(EPSG:4326 geometry, description) of ``aoi``: a vector / WKT / bbox file or bbox string
    (:func:`aegir.store.region_files.read_aoi`), else a country name or ISO code looked up in ``boundaries``."""
    if not _looks_like_place_name(aoi):
        return region_files.read_aoi(aoi), str(aoi)
    return country_boundary(aoi, boundaries)


def country_boundary(name: str, boundaries: str | Path | None = None) -> tuple[shapely.Geometry, str]:
    """(EPSG:4326 polygon, description) of the country ``name`` (or ISO code) in the ``boundaries`` vector file
    (default: :func:`bundled_boundaries`). ValueError naming the file for unknown names or unusable files."""
    path = Path(boundaries) if boundaries else bundled_boundaries()
    if path is None:
        raise FileNotFoundError(f"AOI {name!r} is not a file and no country boundary file is available: pass "
                                "--boundaries FILE, or --aoi path/to/country.geojson")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such country boundary file")
    frame = mask_files.read_vector_file(path, "country boundaries")
    if getattr(frame, "crs", None) is None:  # also a table without geometry (a plain DataFrame)
        raise ValueError(f"{path}: the country boundary file holds no georeferenced geometry (no CRS)")
    columns = {c.lower(): c for c in frame.columns if c != frame.geometry.name}
    searched = [columns[c] for c in (*NAME_COLUMNS, *CODE_COLUMNS) if c in columns]
    if not searched:
        raise ValueError(f"{path}: no country name or ISO code column ({', '.join(NAME_COLUMNS + CODE_COLUMNS)})")
    wanted = name.strip().casefold()
    for column in searched:
        hits = frame[frame[column].astype(str).str.strip().str.casefold() == wanted]
        if len(hits):
            geometry = shapely.make_valid(shapely.union_all(hits.to_crs(4326).geometry.values))
            return geometry, f"{hits[column].iloc[0]} ({path.name}, column {column})"
    names = sorted({str(v) for c in searched[:1] for v in frame[c].dropna()})
    close = difflib.get_close_matches(name, names, n=3)
    raise ValueError(f"{path}: no country {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))


def read_builtup(path: str | Path) -> dict[str, float]:
    """{S2 cell token: built-up evidence in [0, 1]} from a Parquet or CSV file with columns ``cell_token`` and
    ``builtup``; ValueError naming the file when a column is missing or a value is outside [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such built-up file")
    try:
        table = pa.parquet.read_table(path) if path.suffix.lower() == ".parquet" else pa.csv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: cannot read built-up evidence ({exc})") from exc
    missing = {"cell_token", "builtup"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: built-up evidence needs columns cell_token, builtup; missing {sorted(missing)}")
    values = table["builtup"].to_numpy(zero_copy_only=False).astype(np.float64)
    if not np.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        raise ValueError(f"{path}: builtup values must lie in [0, 1]")
    return dict(zip(table["cell_token"].to_pylist(), values.tolist()))


def read_throughput(path: str | Path) -> dict:
    """The last JSON object with ``chips_per_s`` in ``path`` (one JSON document, or JSON lines such as the child
    lines of ``bench/inference.py`` or ``aegir infer region --json``); ValueError naming the file when none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark JSON file")
    text = path.read_text()
    try:
        documents = [json.loads(text)]
    except json.JSONDecodeError:
        try:
            documents = [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: neither one JSON document nor JSON lines ({exc})") from exc
    found = [d for d in _objects(documents) if isinstance(d.get("chips_per_s"), (int, float)) and d["chips_per_s"] > 0]
    if not found:
        raise ValueError(f"{path}: no JSON object with a positive chips_per_s")
    return found[-1]


def _objects(documents: list) -> list[dict]:
    """The dicts of ``documents``, descending one level into lists (a JSON array of runs)."""
    out: list[dict] = []
    for doc in documents:
        out.extend([d for d in doc if isinstance(d, dict)] if isinstance(doc, list) else [doc] if isinstance(doc, dict) else [])
    return out
