"""Hamilton dataflow: Satellogic EarthView Parquet shards (``satellogic`` and ``sentinel_2`` subsets) → Chips.

Every public function is a DAG node named for what it returns; parameters are other nodes or driver inputs.

The published layout (HF dataset ``satellogic/EarthView``, one Parquet shard per file, e.g.
``satellogic/train-00000-of-07863.parquet``, ``sentinel_2/sentinel_2-0/train-00000-of-00010.parquet``): one row
per location, image columns are HF ``Array4D`` features stored as nested Parquet lists of shape
(revisits T, bands C, H, W), plus a ``metadata`` column (a struct, or a JSON string in some versions).

What was verified (dataset card, the official EarthView-Viewer code and a maintainer's answer on the hub):
the subsets and products (Satellogic ``rgb`` and ``1m`` NIR at 1 m; Sentinel-2 ``rgb``, ``10m`` NIR,
``20m`` red-edge/NIR/SWIR, ``scl``, ``40m`` from 60 m), the (T, C, H, W) order, metadata that may be a JSON
string, Satellogic ``metadata["crs"]`` as a per-revisit list of ``"EPSG:326xx"`` strings with
``metadata["bounds"]`` in that CRS (a flat (minx, miny, maxx, maxy) in the current version, a per-revisit list
of them in the first), and Sentinel-2 ``metadata["tileGeometry"]`` as a per-revisit polygon with ``crs`` and
``coordinates``. What is assumed: the timestamp key (``timestamp``/``timestamps``/``datetime``, per revisit),
the band names inside each product (e.g. ``20m`` = B05, B06, B07, B8A, B11, B12), and that the bounds /
tileGeometry are the chip's own footprint. The last one is checked: the pixel size the bounds imply must match
the product's nominal GSD within 5 %, else a ValueError names the file and row (so a footprint that is really
a whole 110 km S2 tile fails loudly rather than producing a wrong grid).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from affine import Affine
from rasterio.crs import CRS

from aegir.utils import geo
from aegir.utils.types import Chip

SUBSETS = ("satellogic", "sentinel_2")
# product column → (nominal GSD in m, band names by band count)
PRODUCTS: dict[str, dict[str, tuple[float, dict[int, tuple[str, ...]]]]] = {
    "satellogic": {
        "rgb": (1.0, {3: ("red", "green", "blue")}),
        "1m": (1.0, {1: ("nir",)}),
    },
    "sentinel_2": {
        "rgb": (10.0, {3: ("B04", "B03", "B02")}),
        "10m": (10.0, {1: ("B08",)}),
        "20m": (20.0, {6: ("B05", "B06", "B07", "B8A", "B11", "B12")}),
        "scl": (20.0, {1: ("SCL",)}),
        "40m": (40.0, {3: ("B01", "B09", "B10"), 2: ("B01", "B09")}),
    },
}
DEFAULT_PRODUCTS = {"satellogic": ("rgb", "1m"), "sentinel_2": ("rgb", "10m")}
SENSORS = {"satellogic": "satellogic-1m", "sentinel_2": "sentinel-2-l2a"}
GSD_TOLERANCE = 0.05
FILE_COLUMN, ROW_COLUMN = "earthview_file", "earthview_row"


def _shard_paths(fs: fsspec.AbstractFileSystem, root: str, source: str) -> list[str]:
    """The Parquet files at ``root``: the file itself, or every ``*.parquet`` below a directory (sorted)."""
    if fs.isdir(root):
        paths = sorted(fs.glob(root.rstrip("/") + "/**/*.parquet"))
        if not paths:
            raise FileNotFoundError(f"{source}: directory has no *.parquet EarthView shards")
        return paths
    if not fs.exists(root):
        raise FileNotFoundError(f"{source}: no such EarthView shard")
    return [root]


def _read_shard(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None, limit: int | None) -> pa.Table:
    """Up to ``limit`` rows of one shard (read batch by batch), with the file and row index appended."""
    name = fs.unstrip_protocol(path)
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            batches, rows = [], 0
            for batch in parquet.iter_batches(batch_size=16, columns=columns):
                batches.append(batch)
                rows += batch.num_rows
                if limit is not None and rows >= limit:
                    break
            table = pa.Table.from_batches(batches, schema=parquet.schema_arrow if columns is None else None)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"{name}: cannot read as a Parquet shard ({exc})") from exc
    table = table.slice(0, limit) if limit is not None else table
    if "metadata" not in table.column_names:
        raise ValueError(f"{name}: not an EarthView shard (no 'metadata' column; columns {table.column_names})")
    table = table.append_column(FILE_COLUMN, pa.array([name] * table.num_rows, pa.string()))
    return table.append_column(ROW_COLUMN, pa.array(np.arange(table.num_rows), pa.int64()))


def earthview_table(
    earthview_source: str,
    earthview_storage_options: dict | None = None,
    earthview_max_rows: int | None = None,
    earthview_columns: Sequence[str] | None = None,
) -> pa.Table:
    """Rows of the EarthView shard(s) at ``earthview_source`` (local path or fsspec URL: file, directory, or
    e.g. ``hf://datasets/satellogic/EarthView/...``), at most ``earthview_max_rows``, only the named columns
    (plus ``metadata``) when given; ``earthview_file`` / ``earthview_row`` columns say where each row came from."""
    fs, root = fsspec.core.url_to_fs(earthview_source, **(earthview_storage_options or {}))
    columns = None if earthview_columns is None else list(dict.fromkeys([*earthview_columns, "metadata"]))
    tables, remaining = [], earthview_max_rows
    for path in _shard_paths(fs, root, earthview_source):
        table = _read_shard(fs, path, columns, remaining)
        tables.append(table)
        if remaining is not None:
            remaining -= table.num_rows
            if remaining <= 0:
                break
    if len({t.schema.field("metadata").type for t in tables}) > 1:  # struct in one shard, JSON text in another
        tables = [_metadata_as_json(t) for t in tables]
    return pa.concat_tables(tables, promote_options="permissive")


def _metadata_as_json(table: pa.Table) -> pa.Table:
    """``table`` with its ``metadata`` column as JSON strings (struct values serialised)."""
    column = table["metadata"]
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return table
    text = pa.array([None if v is None else json.dumps(v) for v in column.to_pylist()], pa.string())
    return table.set_column(table.schema.get_field_index("metadata"), "metadata", text)


def _cell_array(table: pa.Table, column: str, row: int) -> np.ndarray:
    """One nested-list cell as an ndarray (T, C, H, W); a (C, H, W) cell becomes T = 1."""
    where = f"{table[FILE_COLUMN][row].as_py()} row {table[ROW_COLUMN][row].as_py()}"
    if column not in table.column_names:
        raise ValueError(f"{where}: no product column {column!r}; columns are {table.column_names}")
    array = table[column].slice(row, 1).combine_chunks()
    if isinstance(array.type, pa.ExtensionType):
        array = array.storage
    if array.null_count:
        raise ValueError(f"{where}: product {column!r} is null")
    shape = []
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(
            array.type):
        lengths = np.unique(array.value_lengths().to_numpy(zero_copy_only=False))
        if len(lengths) > 1:
            raise ValueError(f"{where}: product {column!r} is ragged (lengths {lengths.tolist()})")
        shape.append(int(lengths[0]) if len(lengths) else 0)
        array = array.flatten()
    values = array.to_numpy(zero_copy_only=False).reshape(shape)
    if values.ndim == 3:
        values = values[None]
    if values.ndim != 4:
        raise ValueError(f"{where}: product {column!r} has shape {values.shape}, expected (T, C, H, W)")
    return values


def _metadata(table: pa.Table, row: int) -> dict:
    """The row's metadata as a dict (struct column or JSON string)."""
    value = table["metadata"][row].as_py()
    return json.loads(value) if isinstance(value, (str, bytes)) else dict(value or {})


def _per_revisit(value: object, revisit: int) -> object:
    """``value[revisit]`` for a per-revisit list, ``value`` itself otherwise."""
    return value[revisit] if isinstance(value, list) else value


def _crs(value: object) -> CRS:
    """CRS from 'EPSG:xxxx', an EPSG int, a WKT/PROJ string or a GeoJSON named-CRS dict."""
    if isinstance(value, dict):
        value = value.get("properties", {}).get("name") or value.get("name") or value
    return CRS.from_user_input(value)


def _footprint(meta: dict, revisit: int, where: str) -> tuple[CRS, tuple[float, float, float, float]]:
    """(CRS, (minx, miny, maxx, maxy)) of one revisit from ``bounds``+``crs`` or ``tileGeometry``."""
    try:
        if "tileGeometry" in meta:
            geometry = _per_revisit(meta["tileGeometry"], revisit)
            ring = np.asarray(geometry["coordinates"][0], dtype=np.float64)
            return _crs(geometry["crs"]), (ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max())
        crs = _crs(_per_revisit(meta.get("crs", meta.get("epsg")), revisit))
        bounds = meta["bounds"]
        bounds = bounds[revisit] if isinstance(bounds[0], (list, tuple)) else bounds
        return crs, tuple(float(v) for v in bounds)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: metadata has no usable footprint for revisit {revisit} ({exc!r})") from exc


def _timestamp(meta: dict, revisit: int) -> str | None:
    """The revisit's timestamp (ISO string) under ``timestamp``/``timestamps``/``datetime``, if any."""
    for key in ("timestamp", "timestamps", "datetime"):
        if key in meta and meta[key] is not None:
            value = meta[key]
            return str(value[revisit] if isinstance(value, list) else value)
    return None


def _grid(crs: CRS, bounds: tuple[float, ...], width: int, height: int, nominal: float, where: str) -> Affine:
    """North-up transform of the footprint, checked against the product's nominal GSD (projected metres)."""
    left, bottom, right, top = bounds
    transform = Affine((right - left) / width, 0.0, left, 0.0, -(top - bottom) / height, top)
    if crs.is_projected and crs.linear_units_factor[1] == 1.0:
        for size in (transform.a, -transform.e):
            if abs(size - nominal) > GSD_TOLERANCE * nominal:
                raise ValueError(f"{where}: metadata footprint implies {size:.3f} m pixels for a {width}x{height} "
                                 f"image, expected {nominal} m; the bounds are not this chip's footprint")
    return transform


def _band_names(subset: str, product: str, count: int) -> tuple[str, ...]:
    """Band names of a product by band count; ``<product>_<i>`` when the count is not the documented one."""
    names = PRODUCTS[subset][product][1].get(count)
    return names or tuple(f"{product}_{i}" for i in range(1, count + 1))


def earthview_chips(
    earthview_table: pa.Table,
    earthview_subset: str = "satellogic",
    earthview_products: Sequence[str] | None = None,
) -> list[Chip]:
    """One Chip per row and revisit: the requested products (default Satellogic rgb+1m, Sentinel-2 rgb+10m)
    stacked as bands on the footprint grid from the metadata; the products must share one pixel grid.

    ``acquired_at`` is the revisit's timestamp; ``extras`` hold the row, revisit, products and raw metadata.
    """
    if earthview_subset not in SUBSETS:
        raise ValueError(f"unknown EarthView subset {earthview_subset!r}; supported: {', '.join(SUBSETS)}")
    products = tuple(earthview_products or DEFAULT_PRODUCTS[earthview_subset])
    unknown = [p for p in products if p not in PRODUCTS[earthview_subset]]
    if unknown:
        raise ValueError(f"EarthView {earthview_subset}: unknown products {unknown}; "
                         f"known: {sorted(PRODUCTS[earthview_subset])}")
    nominal = {PRODUCTS[earthview_subset][p][0] for p in products}
    if len(nominal) > 1:
        raise ValueError(f"EarthView products {products} have different GSDs {sorted(nominal)} m; load them apart")
    nominal_gsd = nominal.pop()
    chips = []
    for row in range(earthview_table.num_rows):
        where = f"{earthview_table[FILE_COLUMN][row].as_py()} row {earthview_table[ROW_COLUMN][row].as_py()}"
        arrays = [_cell_array(earthview_table, product, row) for product in products]
        if len({a.shape[0] for a in arrays}) > 1 or len({a.shape[2:] for a in arrays}) > 1:
            raise ValueError(f"{where}: products {products} differ in revisits or size: {[a.shape for a in arrays]}")
        bands = sum((_band_names(earthview_subset, p, a.shape[1]) for p, a in zip(products, arrays)), ())
        meta = _metadata(earthview_table, row)
        height, width = arrays[0].shape[2:]
        for revisit in range(arrays[0].shape[0]):
            crs, bounds = _footprint(meta, revisit, where)
            transform = _grid(crs, bounds, width, height, nominal_gsd, where)
            chips.append(Chip(
                pixels=np.concatenate([a[revisit] for a in arrays], axis=0), crs=crs, transform=transform,
                gsd_m=geo.ground_gsd_m(transform, crs, width, height), bands=bands,
                source=f"{where} revisit {revisit}", sensor=SENSORS[earthview_subset],
                acquired_at=_timestamp(meta, revisit), georeferenced=True,
                extras={"row": row, "revisit": revisit, "products": products, "subset": earthview_subset,
                        "metadata": meta},
            ))
    return chips


# ---- single rows, for the imagery catalog (one image per row and revisit) ------------------------------------

_ALL_PRODUCTS = {product for subset in PRODUCTS.values() for product in subset}
_SENTINEL2_ONLY = set(PRODUCTS["sentinel_2"]) - set(PRODUCTS["satellogic"])


def looks_like_earthview(column_names: Sequence[str]) -> bool:
    """True when a Parquet schema has EarthView's ``metadata`` column and at least one product column."""
    return "metadata" in column_names and bool(_ALL_PRODUCTS & set(column_names))


def earthview_row_layout(earthview_table: pa.Table, row: int = 0) -> tuple[str, tuple[str, ...]]:
    """(subset, products) of one row as the catalog stacks it: Sentinel-2 when an S2-only product column is
    present (or, for an rgb-only shard, the row's metadata has ``tileGeometry``), else Satellogic; the subset's
    default products that are present, else the present ones of the finest GSD. ValueError when not EarthView."""
    columns = set(earthview_table.column_names)
    if not looks_like_earthview(earthview_table.column_names):
        raise ValueError(f"not an EarthView shard (columns {sorted(columns)})")
    if columns & _SENTINEL2_ONLY:
        subset = "sentinel_2"
    elif "1m" in columns:
        subset = "satellogic"
    else:
        subset = "sentinel_2" if "tileGeometry" in _metadata(earthview_table, row) else "satellogic"
    products = tuple(p for p in DEFAULT_PRODUCTS[subset] if p in columns)
    if not products:
        present = [p for p in PRODUCTS[subset] if p in columns]
        finest = min(PRODUCTS[subset][p][0] for p in present)
        products = tuple(p for p in present if PRODUCTS[subset][p][0] == finest)
    return subset, products


def earthview_shard_rows(earthview_source: str, rows: Sequence[int] | None = None) -> Iterator[pa.Table]:
    """One-row tables (with ``earthview_file`` / ``earthview_row``) of one shard, in order — all rows or only
    ``rows`` — read row group by row group so a large shard is never held whole; ValueError when unreadable."""
    fs, path = fsspec.core.url_to_fs(earthview_source)
    name = fs.unstrip_protocol(path)
    wanted = None if rows is None else set(rows)
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            if "metadata" not in parquet.schema_arrow.names:
                raise ValueError(f"{name}: not an EarthView shard (no 'metadata' column)")
            start = 0
            for group in range(parquet.num_row_groups):
                count = parquet.metadata.row_group(group).num_rows
                picked = [i for i in range(count) if wanted is None or start + i in wanted]
                if picked:
                    table = parquet.read_row_group(group)
                    for i in picked:
                        one = table.slice(i, 1)
                        one = one.append_column(FILE_COLUMN, pa.array([name], pa.string()))
                        yield one.append_column(ROW_COLUMN, pa.array([start + i], pa.int64()))
                start += count
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"{name}: cannot read as a Parquet shard ({exc})") from exc
