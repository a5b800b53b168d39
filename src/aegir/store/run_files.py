"""Files of a job's run folder: JSON reports and state, Parquet / GeoParquet tables, CSV, PNG, figures, TOML.

Small named readers and writers so that jobs (:mod:`aegir.pipelines`) never open files themselves. Every writer
creates the parent folder and returns the path written; ``atomic=True`` writes a temporary file beside the target
and renames it over the target, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def ensure_dir(path: str | Path) -> Path:
    """``path`` as a folder (created with its parents when missing)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_file(path: str | Path) -> bool:
    """Whether ``path`` is an existing regular file."""
    return Path(path).is_file()


def _parent(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_text(text: str, path: str | Path, atomic: bool = False) -> Path:
    """``text`` → ``path`` (UTF-8); ``atomic``: through ``<path>.tmp`` and a rename."""
    path = _parent(path)
    if not atomic:
        path.write_text(text)
        return path
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_json(data: Any, path: str | Path, indent: int | None = 1, atomic: bool = False) -> Path:
    """``data`` as JSON (values JSON cannot hold are written as ``str(value)``)."""
    return write_text(json.dumps(data, indent=indent, default=str), path, atomic)


def read_json(path: str | Path) -> Any:
    """The JSON document in ``path`` (``json.JSONDecodeError`` when it is not JSON)."""
    return json.loads(Path(path).read_text())


def read_toml(path: str | Path, what: str = "TOML file") -> dict[str, Any]:
    """The TOML document in ``path``; ``FileNotFoundError`` naming ``what`` when there is no such file
    (``tomllib.TOMLDecodeError`` when it is not TOML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    return tomllib.loads(path.read_text())


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    """An Arrow table → Parquet."""
    path = _parent(path)
    pq.write_table(table, path)
    return path


def read_parquet(path: str | Path, columns: list[str] | None = None, missing_ok: bool = False) -> pa.Table | None:
    """The Parquet table in ``path`` (only ``columns`` when given); None for a missing file when ``missing_ok``."""
    if missing_ok and not Path(path).is_file():
        return None
    return pq.read_table(path, columns=columns)


def read_geoparquet(path: str | Path, missing_ok: bool = False):
    """The GeoDataFrame in a GeoParquet file (CRS as stored); None for a missing file when ``missing_ok``."""
    import geopandas as gpd

    if missing_ok and not Path(path).is_file():
        return None
    return gpd.read_parquet(path)


def write_npz(arrays: dict[str, np.ndarray], path: str | Path) -> Path:
    """``arrays`` as one compressed ``.npz`` (written to a temporary name, then renamed)."""
    path = _parent(path)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(partial, **arrays)
    partial.replace(path)
    return path


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, loaded (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def write_geoparquet(frame: Any, path: str | Path) -> Path:
    """A GeoDataFrame as GeoParquet."""
    path = _parent(path)
    frame.to_parquet(path)
    return path


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Rows (dicts with the keys of the first row) → CSV with a header line."""
    path = _parent(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_png(pixels: np.ndarray, path: str | Path) -> Path:
    """(H, W) or (H, W, 3) uint8 array → PNG."""
    from PIL import Image

    path = _parent(path)
    Image.fromarray(pixels).save(path)
    return path


def write_figure(figure: Any, path: str | Path) -> Path:
    """A matplotlib Figure → image file (format from the suffix)."""
    path = _parent(path)
    figure.savefig(path)
    return path


def write_graphviz(digraph: Any, path: str | Path) -> Path:
    """A ``graphviz.Digraph``: ``.dot`` as Graphviz source, other suffixes rendered by the ``dot`` program
    (RuntimeError when it is not installed). Returns the file written."""
    import graphviz

    path = _parent(path)
    if path.suffix == ".dot":
        path.write_text(digraph.source)
        return path
    try:
        return Path(digraph.render(outfile=path, cleanup=True))
    except graphviz.ExecutableNotFound as exc:
        raise RuntimeError(
            f"cannot render {path}: the Graphviz `dot` program is not installed (apt-get install graphviz); "
            "write a .dot file instead"
        ) from exc
